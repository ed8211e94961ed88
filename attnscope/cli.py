"""``attnscope`` command line: analyze, models, query."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attnscope.errors import AttnscopeError, RunExistsError

DEMO_PROMPT = (
    "Question: Tom has 3 boxes with 4 apples in each box. He eats 2 apples. "
    "How many apples are left?\nAnswer: Let's think step by step."
)


def _analyze(args: argparse.Namespace) -> int:
    from attnscope.analyze import analyze
    from attnscope.models import load
    from attnscope.report import write_report

    out = Path(args.out)
    if out.exists() and not args.overwrite:  # refuse before the slow part
        raise RunExistsError(f"run directory {out} already exists; pass --overwrite to replace it")
    print(f"loading {args.model} ...", file=sys.stderr)
    lm = load(args.model)
    layers = _int_list(args.layers)
    keep_qk = True if args.keep_qk == "all" else (_int_list(args.keep_qk) or False)
    trace = analyze(
        lm,
        args.prompt,
        generate=args.generate,
        backend=args.backend,
        layers=layers,
        keep_qk=keep_qk,
    )
    trace.save(out, overwrite=args.overwrite)
    report = write_report(trace, out)
    groups = trace.head_groups()
    print(
        f"{len(trace)} tokens ({trace.spans}) x {len(trace.layers)} layers x {trace.n_heads} heads,"
        f" backend {trace.meta['backend']}, {trace.meta['seconds']:.1f} s"
    )
    if trace.meta.get("generated_text"):
        print(f"generated: {trace.meta['generated_text']!r}")
    print(
        f"local heads: {int(groups['local'].sum())}, global heads: {int(groups['global'].sum())}, "
        f"sink heads: {int(trace.sink_heads().sum())}"
    )
    print(f"results: {out / 'stats.parquet'} and {out / 'trace.json'}")
    print(f"report:  {report.resolve()}")
    return 0


def _int_list(text: str | None) -> list[int] | None:
    """``"0,3,5"`` -> [0, 3, 5]; a clear error for anything else."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError as err:
        raise ValueError(f"expected comma-separated layer indices, got {text!r}") from err


def _models(args: argparse.Namespace) -> int:
    from attnscope.models.registry import ALIASES

    print(f"{'alias':<16} {'kind':<10} {'cached':<7} {'size':<22} description")
    for a in ALIASES.values():
        cached = "yes" if a.is_cached() else "no"
        print(f"{a.name:<16} {a.kind:<10} {cached:<7} {a.size:<22} {a.description}")
    return 0


def _query(args: argparse.Namespace) -> int:
    from attnscope.store import RunStore

    table = RunStore(args.runs).sql(args.sql)
    rows = [[str(v) for v in row.values()] for row in table.to_pylist()]
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
        for i, c in enumerate(table.column_names)
    ]
    for line in [table.column_names, *rows]:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnscope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="run a model on a prompt and store its attention statistics")
    p.add_argument("--model", default="gemma3-270m", help="alias, local directory or cached HF id")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--generate", type=int, default=0, help="greedy tokens to generate")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--backend", default="auto", help="auto | chunked | dense | triton")
    p.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    p.add_argument(
        "--keep-qk",
        default=None,
        help="layers whose queries/keys are kept for heatmaps: 'all' or '0,5,11'",
    )
    p.set_defaults(func=_analyze)

    p = sub.add_parser("models", help="list model aliases and whether their cache is built")
    p.set_defaults(func=_models)

    p = sub.add_parser("query", help="DuckDB SQL over runs: tables `stats` and `runs`")
    p.add_argument("runs", help="runs root directory")
    p.add_argument("sql")
    p.set_defaults(func=_query)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (AttnscopeError, ValueError) as err:
        print(f"attnscope: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
