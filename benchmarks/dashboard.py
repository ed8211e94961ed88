"""Server-side time of each explorer view on long synthetic runs (goal: every view under 1 s).

An 8K-token run shaped like Gemma-3-270M (18 layers x 4 heads, q/k of 3 layers with 1 KV head,
d 256, stored as float16) with random statistics, a second one for the run comparison, and a
32K-token run with the q/k of one layer for the heatmap. Each view is the callback's function plus the JSON encoding of
its figures (what Dash sends to the browser); one warm-up, then the median of N repetitions.

    python benchmarks/dashboard.py [--tokens 8192] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import plotly.graph_objects as go
import torch
from plotly.io.json import to_json_plotly

sys.path.insert(0, str(Path(__file__).parent))
from harness import fmt_time, measure, write_section

from attnscope.dashboard import callbacks, data
from attnscope.store import RunStore
from attnscope.trace import Trace

ROWS = ("entropy", "mean_distance", "waad", "sink_mass", "max_attention")
COLS = ("received", "fai", "sink_score")
HEADS, KV_HEADS, HEAD_DIM = 4, 1, 256


def synthetic_trace(n: int, n_layers: int, qk_layers: tuple[int, ...], seed: int) -> Trace:
    """Random statistics for every metric, random post-RoPE-like q/k for ``qk_layers``."""
    g = torch.Generator().manual_seed(seed)
    shape = (n_layers, HEADS, n)
    return Trace(
        tokens=[f"tok{i % 977}" for i in range(n)],
        token_ids=[i % 977 for i in range(n)],
        spans={"prompt": (0, n // 4), "response": (n // 4, n)},
        layers=list(range(n_layers)),
        n_heads=HEADS,
        rows={m: torch.rand(shape, generator=g) for m in ROWS},
        cols={m: torch.rand(shape, generator=g) for m in COLS},
        meta={
            "model": "synthetic",
            "qk_attention": {
                str(layer): {
                    "scale": HEAD_DIM**-0.5,
                    "causal": True,
                    "sliding_window": None,
                    "softcap": None,
                    "sinks": None,
                }
                for layer in qk_layers
            },
        },
        qk={
            layer: (
                torch.randn(HEADS, n, HEAD_DIM, generator=g),
                torch.randn(KV_HEADS, n, HEAD_DIM, generator=g),
            )
            for layer in qk_layers
        },
    )


def figures_of(outputs: object) -> list[go.Figure]:
    """The figures in a view's outputs (nested tuples included)."""
    if isinstance(outputs, go.Figure):
        return [outputs]
    if isinstance(outputs, tuple):
        return [f for o in outputs for f in figures_of(o)]
    return []


def payload_kb(outputs: object) -> float:
    """Size of the figures' JSON in a view's outputs (what the browser downloads)."""
    return sum(len(to_json_plotly(f)) for f in figures_of(outputs)) / 1024


def views(store: RunStore, n: int) -> dict[str, Callable[[], object]]:
    mid = n // 2
    end = (n - 2048, 2048)
    head = {"layer": 8, "head": 1}
    log = ["log"]

    def cold_run_load() -> object:
        data.clear_caches()
        return callbacks.run_view(store, "long", None, None), callbacks.head_grid_view(
            store, "long", head
        )

    return {
        f"run picker: read the {n}-token run + head grid (cold)": cold_run_load,
        "token strip, entropy over all layers": lambda: callbacks.strip_view(
            store, "long", "entropy", data.ALL_LAYERS
        ),
        "token strip, fai on layer 9": lambda: callbacks.strip_view(store, "long", "fai", 9),
        "where the token attends: head row + every head of the layer": lambda: (
            callbacks.attend_view(store, "long", mid, head, log)
        ),
        "where the token attends: layer x head grid (3 kept layers)": lambda: (
            callbacks.destinations_view(store, "long", mid)
        ),
        "token statistics (maps + table)": lambda: callbacks.token_view(
            store, "long", mid, "entropy"
        ),
        "head grid with the selected head": lambda: callbacks.head_grid_view(store, "long", head),
        "head click detail (curve + numbers)": lambda: callbacks.head_view(
            store, "long", head, "waad"
        ),
        "head overview, 256-token window (12 thumbnails)": lambda: callbacks.overview_view(
            store, "long", head, 0, 256
        ),
        f"head overview, whole {n}-token run": lambda: callbacks.overview_view(
            store, "long", head, 0, n
        ),
        "head view (lines), 100 tokens": lambda: callbacks.lines_view(
            store, "long", head, mid, 100, mid
        ),
        "heatmap, 256 tokens, log + hide sink + renormalise": lambda: callbacks.heatmap_view(
            store, "long", head, mid, 256, ["log", "nosink", "renorm"], mid
        ),
        "heatmap, 2K window at the end (exact)": lambda: callbacks.heatmap_view(
            store, "long", head, *end, log, None
        ),
        f"heatmap, whole {n}-token run": lambda: callbacks.heatmap_view(
            store, "long", head, 0, n, log, None
        ),
        "run comparison: lines, grids, strips, heatmap pair": lambda: callbacks.compare_view(
            store, "long", "other", "entropy", head, mid, 256
        ),
        "token strip of the 32K-token run": lambda: callbacks.strip_view(
            store, "32k", "entropy", data.ALL_LAYERS
        ),
        "heatmap, 2K window at the end of a 32K-token run": lambda: callbacks.heatmap_view(
            store, "32k", {"layer": 0, "head": 1}, 32768 - 2048, 2048, log, None
        ),
        "heatmap, whole 32K-token run": lambda: callbacks.heatmap_view(
            store, "32k", {"layer": 0, "head": 1}, 0, 32768, log, None
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("writing synthetic runs ...", file=sys.stderr)
        synthetic_trace(args.tokens, 18, (0, 8, 17), seed=0).save(root / "long")
        synthetic_trace(args.tokens, 18, (), seed=1).save(root / "other")
        synthetic_trace(32768, 1, (0,), seed=2).save(root / "32k")
        store = RunStore(root)
        load_before = os.getloadavg()[0]
        lines = ["| view | time | figure JSON |", "|---|---|---|"]
        worst = 0.0
        for name, view in views(store, args.tokens).items():
            result = measure(
                lambda view=view: [to_json_plotly(f) for f in figures_of(view())], args.reps
            )
            size = payload_kb(view())
            lines.append(f"| {name} | {fmt_time(result['times'])} | {size:.0f} KB |")
            worst = max(worst, sorted(result["times"])[len(result["times"]) // 2])
            print(lines[-1], file=sys.stderr)
    table = "\n".join(lines)
    body = (
        f"Synthetic runs: {args.tokens} tokens x 18 layers x {HEADS} heads (q/k of 3 layers, "
        f"{KV_HEADS} KV head, d {HEAD_DIM}) and 32768 tokens x 1 layer. Time = the view's callback "
        f"function plus JSON encoding of its figures, median of {args.reps} after a warm-up "
        f"(min-max); torch threads = {torch.get_num_threads()}; 1-minute load average "
        f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after (shared machine). Heatmaps are pooled to at most "
        f"{data.MAX_CELLS} x {data.MAX_CELLS} blocks; beyond {data.SCORE_BUDGET:,} scores per "
        "view the block means are estimated from evenly spaced query rows of each block.\n\n"
        f"{table}\n\nSlowest view: {worst:.3f} s (goal: under 1 s)."
    )
    print(body)
    write_section("dashboard views (CPU)", "python benchmarks/dashboard.py", body)


if __name__ == "__main__":
    main()
