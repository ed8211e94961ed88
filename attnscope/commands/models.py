"""``attnscope models``: the alias table and whether each alias's cache is built (or damaged)."""

from __future__ import annotations

import argparse

from attnscope.models.registry import ALIASES

_SHOWN = {"complete": "yes", "missing": "no", "damaged": "damaged"}  # damaged: rebuilt on next use


def run(args: argparse.Namespace) -> int:
    print(f"{'alias':<16} {'kind':<10} {'cached':<7} {'size':<22} description")
    for a in ALIASES.values():
        print(
            f"{a.name:<16} {a.kind:<10} {_SHOWN[a.cache_state()]:<7} {a.size:<22} {a.description}"
        )
    return 0
