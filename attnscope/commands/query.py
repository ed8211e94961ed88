"""``attnscope query``: one DuckDB SELECT over the runs under a directory, as aligned text."""

from __future__ import annotations

import argparse

from attnscope.store import RunStore


def run(args: argparse.Namespace) -> int:
    table = RunStore(args.runs).sql(args.sql)
    rows = [[str(v) for v in row.values()] for row in table.to_pylist()]
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
        for i, c in enumerate(table.column_names)
    ]
    for line in [table.column_names, *rows]:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))
    return 0
