"""``attnscope heads``: the head table of a causal LM (layer, head, each score, a label), printed
by label; with ``--out`` also a run directory: the detector text's trace plus ``heads.parquet``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow.parquet as pq

from attnscope.commands.common import writing_run
from attnscope.models.loader import load
from attnscope.taxonomy.detect import detect

HEADS_FILE = "heads.parquet"
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
                extra=lambda tmp: pq.write_table(table, tmp / HEADS_FILE),
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
        print(f"run: {out.resolve()} (head table: {HEADS_FILE})")
    return 0


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
