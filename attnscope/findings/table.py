"""One table for every reproduction: finding | published figure | attnscope on the packaged model
| how measured."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

import pyarrow as pa

HEADERS = {
    "finding": "finding",
    "published": "published figure",
    "measured": "attnscope on the packaged model",
    "how": "how measured",
}


@dataclass(frozen=True)
class Row:
    finding: str
    published: str
    measured: str
    how: str


def _cell(text: str) -> str:
    """Markdown-safe table cell: one line, escaped pipes."""
    return " ".join(text.split()).replace("|", "\\|")


def markdown(rows: Iterable[Row]) -> str:
    """The rows as a GitHub markdown table."""
    names = [f.name for f in fields(Row)]
    lines = [
        "| " + " | ".join(HEADERS[n] for n in names) + " |",
        "|" + "---|" * len(names),
    ]
    lines += ["| " + " | ".join(_cell(getattr(r, n)) for n in names) + " |" for r in rows]
    return "\n".join(lines)


def to_arrow(rows: Iterable[Row]) -> pa.Table:
    """The rows as an Arrow table (one string column per field)."""
    return pa.Table.from_pylist(
        [asdict(r) for r in rows], pa.schema([(f.name, pa.string()) for f in fields(Row)])
    )
