"""``attnscope heads``: the head table of a causal LM (layer, head, each score, a label), printed
by label; with ``--out`` also a run directory: the detector text's trace, ``heads.parquet`` and
``report.html`` (heads coloured by each score)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from attnscope.commands.common import writing_run
from attnscope.models.loader import load
from attnscope.report import write_report
from attnscope.runfiles import HEADS_FILE
from attnscope.taxonomy.detect import detect
from attnscope.trace import Trace

SHOWN = ("induction_random", "prev_token", "duplicate_token", "induction", "retrieval", "sink")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    print(f"loading {args.model} ...", file=sys.stderr)
    if out is not None:
        with writing_run(out, args.overwrite):
            trace, table = _detect(args)
            trace.save(
                out,
                overwrite=args.overwrite,
                extra=lambda tmp: _write(trace, table, tmp),
            )
    else:
        trace, table = _detect(args)
    rows = table.to_pylist()
    shown = [c for c in SHOWN if c in table.column_names]
    print(f"{'layer':>5} {'head':>4} " + " ".join(f"{c:>16}" for c in shown) + "  label")
    for row in rows:
        values = " ".join(f"{row[c]:>16.3f}" for c in shown)
        print(f"{row['layer']:>5} {row['head']:>4} {values}  {row['label']}")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    print("labels: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if out is not None:
        print(f"run: {out.resolve()} (head table: {HEADS_FILE}, report: report.html)")
    return 0


def _write(trace: Trace, table: pa.Table, folder: Path) -> None:
    """The head table, then the report, which reads it (``report.write_report``)."""
    pq.write_table(table, folder / HEADS_FILE)
    write_report(trace, folder)


def _detect(args: argparse.Namespace):
    lm = load(args.model)
    return detect(
        lm,
        args.text,
        max_tokens=args.max_tokens,
        n_random=args.random,
        retrieval=args.retrieval,
        seed=args.seed,
        progress=True,
    )
