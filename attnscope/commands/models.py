"""``attnscope models``: the alias table and whether each alias's cache is built."""

from __future__ import annotations

import argparse

from attnscope.models.registry import ALIASES


def run(args: argparse.Namespace) -> int:
    print(f"{'alias':<16} {'kind':<10} {'cached':<7} {'size':<22} description")
    for a in ALIASES.values():
        cached = "yes" if a.is_cached() else "no"
        print(f"{a.name:<16} {a.kind:<10} {cached:<7} {a.size:<22} {a.description}")
    return 0
