"""``attnscope query``: one DuckDB SELECT over the runs under a directory, as aligned text."""

from __future__ import annotations

import argparse
import sys
import warnings

from attnscope.store import RunStore, StoreWarning


def run(args: argparse.Namespace) -> int:
    store = RunStore(
        args.runs,
        timeout=args.timeout or None,
        max_rows=args.max_rows,
        memory_limit=args.memory_limit,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWarning)  # said below, without Python's decoration
        try:
            table = store.sql(args.sql)
        finally:
            for name, why in store.skipped.items():
                print(f"attnscope: warning: skipped run {name!r}: {why}", file=sys.stderr)
    rows = [[str(v) for v in row.values()] for row in table.to_pylist()]
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
        for i, c in enumerate(table.column_names)
    ]
    for line in [table.column_names, *rows]:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))
    if store.truncated:
        print(
            f"attnscope: showing the first {store.max_rows} rows of a longer result: aggregate or "
            "LIMIT in SQL, or pass --max-rows N",
            file=sys.stderr,
        )
    return 0
