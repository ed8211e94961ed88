"""Token text as people read it: vocabulary pieces turned into visible text for axes and hovers.

Traces keep the tokenizer's raw pieces (``Ġthe``, ``▁the``, ``Ċ``, ``<0x0A>``, ``##ing``). Views show
them with the byte-level and SentencePiece markers decoded and whitespace made visible:
``readable("Ġthe") == "␣the"``, ``readable("Ċ") == "↵"``.
"""

from __future__ import annotations

import re
from functools import cache

from transformers.convert_slow_tokenizer import bytes_to_unicode

VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character standing for each byte."""
    return {c: b for b, c in bytes_to_unicode().items()}


def _decode_byte_level(piece: str) -> str | None:
    """The text of a byte-level BPE piece, or None when it holds characters outside that alphabet."""
    table = _byte_of_char()
    if not any(c in ("Ġ", "Ċ", "ĉ", "č") for c in piece) or any(c not in table for c in piece):
        return None
    return bytes(table[c] for c in piece).decode("utf-8", errors="replace")


def readable(piece: str) -> str:
    """One vocabulary piece as visible text (whitespace shown as ␣ ↵ ⇥; empty as ∅)."""
    text = _decode_byte_level(piece)
    if text is None:
        text = _BYTE_FALLBACK.sub(lambda m: chr(int(m.group(1), 16)), piece).replace("▁", " ")
    shown = "".join(VISIBLE.get(c, c) for c in text)
    return shown or "∅"


def labels(tokens: list[str], indexed: bool = False, width: int = 24) -> list[str]:
    """Readable labels for ``tokens``, shortened to ``width`` characters; ``indexed`` prefixes the
    position (``"12 ␣the"``), which keeps repeated tokens apart on a categorical axis."""
    out = []
    for i, tok in enumerate(tokens):
        text = readable(tok)
        if len(text) > width:
            text = text[: width - 1] + "…"
        out.append(f"{i} {text}" if indexed else text)
    return out


def tick_positions(n: int, max_ticks: int = 64) -> list[int]:
    """Positions to label on an axis of ``n`` tokens: all of them up to ``max_ticks``, else an even
    sample that always includes the first and last token."""
    if n <= max_ticks:
        return list(range(n))
    step = -(-(n - 1) // (max_ticks - 1))
    ticks = list(range(0, n, step))
    if ticks[-1] != n - 1:
        ticks.append(n - 1)
    return ticks
