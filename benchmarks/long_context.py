"""Long context on the CPU: Gemma-3-270M at 4K-32K tokens, capture cost as ratios to the forward.

Variants (each run in a fresh subprocess, rounds alternate the order of the variants):
- plain: the SDPA forward (``logits_to_keep=1``), nothing captured;
- default: capture of every default metric (SDPA output kept bit-identical, statistics by the
  chunked backend); rows: capture of the row metrics only;
- fused / fused-rows: ``exact_logits=False``, the attention output computed with the statistics;
- lens: TransformerLens 4 TransformerBridge, run_with_cache of hook_pattern + dense metrics;
- analyze: the whole ``attnscope analyze`` of one prompt (fused, all metrics, q/k kept for 3
  layers, run directory + report), peak memory above the loaded model.

    python benchmarks/long_context.py [--lengths 4096 8192] [--variants plain default ...]
        [--rounds 3] [--threads 1] [--alternate | --layer]

``--alternate`` runs the forwards in one process instead (the model loaded once, variants in
rotating order, ratios paired by round); ``--layer`` times one attention layer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
from capture import dense_metrics, token_ids
from harness import PeakRSS, max_rel_diff, page_in, run_child, write_section

VARIANTS = ("plain", "default", "rows", "fused", "fused-rows")
ROWS = ("entropy", "mean_distance", "waad", "sink_mass", "max_attention")
LENS_GB_PER_4K = 9.8  # measured (RESULTS.md): TransformerLens above the model at 4096 tokens
MEMORY_GB = 10.0  # what this benchmark may use above the model on the shared machine


def capture_forward(lm, variant: str) -> Callable[[torch.Tensor], dict]:
    """One forward of ``variant`` (plain, default, rows, fused, fused-rows) over input ids
    ``[1, T]``; returns the captured statistics by name (none for plain)."""
    import attnscope as asc

    def forward(x: torch.Tensor) -> dict:
        model = lm.model
        if variant == "plain":
            model(input_ids=x, logits_to_keep=1)
            return {}
        options = {"exact_logits": not variant.startswith("fused")}
        if variant.endswith("rows"):
            options["metrics"] = ROWS
        with asc.capture(model, **options) as cap:
            model(input_ids=x, logits_to_keep=1)
        t = cap.trace
        return {**t.rows, **t.cols}

    return forward


def child(variant: str, n: int, threads: int, out: str) -> None:
    import attnscope as asc

    torch.set_num_threads(threads)
    lm = asc.load("gemma3-270m", attn_implementation="eager" if variant == "lens" else "sdpa")
    page_in(lm.model)
    ids = token_ids(lm.tokenizer, n)
    forward = capture_forward(lm, variant)

    if variant == "lens":
        from transformer_lens.model_bridge import TransformerBridge

        from attnscope.models.registry import ALIASES
        from attnscope.probes.lens import disable_torchvision_autoinstall

        disable_torchvision_autoinstall()
        bridge = TransformerBridge.boot_transformers(
            str(ALIASES["gemma3-270m"].locate()), hf_model=lm.model, tokenizer=lm.tokenizer
        )
        names = [f"blocks.{i}.attn.hook_pattern" for i in range(len(bridge.blocks))]

        def forward(x: torch.Tensor) -> dict:  # the lens side of the same work
            _, cache = bridge.run_with_cache(x, names_filter=lambda h: h in names)
            return dense_metrics([cache[h] for h in names])

    if variant == "analyze":
        result = analyze_run(lm, n, out)
        print(json.dumps(result))
        return
    with torch.no_grad():
        forward(ids[:, :256])  # warm-up on a short prefix
        base = psutil.Process().memory_info().rss
        with PeakRSS() as rss:
            start = time.perf_counter()
            result = forward(ids)
            seconds = time.perf_counter() - start
    torch.save(result, out)
    print(json.dumps({"seconds": seconds, "peak_mb": (rss.peak - base) / 2**20}))


def analyze_run(lm, n: int, out: str) -> dict:
    """``attnscope analyze --fused --keep-qk 0,8,17`` of an n-token prompt, report included."""
    from attnscope.analyze import analyze
    from attnscope.report import write_report

    text = lm.tokenizer.decode(token_ids(lm.tokenizer, n)[0], skip_special_tokens=True)
    base = psutil.Process().memory_info().rss
    run = Path(out + ".run")
    with PeakRSS() as rss:
        start = time.perf_counter()
        trace = analyze(lm, text, exact_logits=False, keep_qk=(0, 8, 17))
        trace.save(run, extra=lambda tmp: write_report(trace, tmp))
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_mb": (rss.peak - base) / 2**20,
        "tokens": len(trace),
        "files": sorted(p.name for p in run.iterdir()),
    }


def alternate_table(lengths: list[int], variants: list[str], reps: int, threads: int) -> str:
    """The whole forward of each variant in this process (the model loaded once), a warm-up
    each, then ``reps`` rounds in rotating order. Ratios: the median over rounds of each
    round's time over the same round's plain forward (paired: slow drifts of the machine
    cancel), and their min-max."""
    import attnscope as asc

    torch.set_num_threads(threads)
    lm = asc.load("gemma3-270m", attn_implementation="sdpa")
    page_in(lm.model)
    variants = ["plain", *(v for v in variants if v not in ("plain", "lens", "analyze"))]
    lines = []
    for n in lengths:
        ids = token_ids(lm.tokenizer, n)
        forwards = {v: capture_forward(lm, v) for v in variants}
        times: dict[str, list[float]] = {v: [] for v in variants}
        with torch.no_grad():
            for f in forwards.values():
                f(ids[:, :256])  # warm-up on a short prefix
            for r in range(reps):
                for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
                    start = time.perf_counter()
                    forwards[v](ids)
                    times[v].append(time.perf_counter() - start)
                    print(f"T={n} round {r + 1}/{reps} {v}: {times[v][-1]:.1f} s", flush=True)
        for v in variants:
            paired = [t / p for t, p in zip(times[v], times["plain"], strict=True)]
            lines.append(
                f"| {n} | {v} | {fmt(times[v])} | {statistics.median(paired):.2f}x "
                f"| {min(paired):.2f}-{max(paired):.2f} |"
            )
    return "\n".join(
        [
            "| T | variant | time, median (min-max) | / plain, median of rounds | min-max |",
            "|---|---|---|---|---|",
            *lines,
        ]
    )


def layer_table(lengths: list[int], reps: int, threads: int) -> str:
    """One Gemma-3-270M attention layer (Hq 4, Hkv 1, d 256; causal, and sliding with the bool
    mask transformers builds for SDPA), random q/k/v: SDPA alone, SDPA + statistics (the default
    capture), the fused forward; all in this process, alternating, ``reps`` times."""
    import torch.nn.functional as F

    from attnscope.kernels import attention_stats
    from attnscope.kernels.fused import fused_attention

    torch.set_num_threads(threads)
    lines = []
    for n in lengths:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, h, n, 256, generator=g) for h in (4, 1, 1))
        i = torch.arange(n)
        layers = {
            "global": None,
            "sliding": ((i[None] <= i[:, None]) & (i[:, None] - i[None] < 512)),
        }
        cases = {}
        for kind, band in layers.items():
            sw = None if band is None else 512
            mask = None if band is None else band[None, None]

            def sdpa(mask=mask, q=q, k=k, v=v):
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=mask is None, scale=1 / 16, enable_gqa=True
                )

            def stats(metrics=None, sw=sw, mask=mask, sdpa=sdpa, q=q, k=k):
                sdpa()
                attention_stats(q, k, scale=1 / 16, sliding_window=sw, mask=mask, metrics=metrics)

            def fused(metrics=None, sw=sw, mask=mask, q=q, k=k, v=v):
                fused_attention(
                    q, k, v, scale=1 / 16, sliding_window=sw, mask=mask, metrics=metrics
                )

            cases[kind, "SDPA"] = sdpa
            cases[kind, "SDPA + all metrics"] = stats
            cases[kind, "SDPA + row metrics"] = lambda stats=stats: stats(ROWS)
            cases[kind, "fused, all metrics"] = fused
            cases[kind, "fused, row metrics"] = lambda fused=fused: fused(ROWS)
        times: dict = {c: [] for c in cases}
        for f in cases.values():
            f()  # warm-up
        for _ in range(reps):
            for c, f in cases.items():
                start = time.perf_counter()
                f()
                times[c].append(time.perf_counter() - start)
        for (kind, name), ts in times.items():
            base = times[kind, "SDPA"]
            ratio = statistics.median(ts) / statistics.median(base)
            lo, hi = min(ts) / max(base), max(ts) / min(base)
            lines.append(
                f"| {n} | {kind} | {name} | {fmt(ts, 'ms')} | {ratio:.2f}x ({lo:.2f}-{hi:.2f}) |"
            )
    return "\n".join(
        [
            "| T | layer | work | time | / SDPA (min-max) |",
            "|---|---|---|---|---|",
            *lines,
        ]
    )


def fmt(values: list[float], unit: str = "s") -> str:
    if unit == "ms":
        values = [1000 * v for v in values]
        return f"{statistics.median(values):.0f} ms ({min(values):.0f}-{max(values):.0f})"
    if len(values) == 1:
        return f"{values[0]:.1f} s (1 run)"
    return f"{statistics.median(values):.1f} s ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "T", "THREADS", "OUT"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--layer", action="store_true", help="one attention layer in-process, alternating"
    )
    parser.add_argument(
        "--alternate", action="store_true", help="whole forwards in one process, alternating"
    )
    args = parser.parse_args()
    if args.child:
        variant, n, threads, out = args.child
        child(variant, int(n), int(threads), out)
        return
    if args.alternate:
        table = alternate_table(args.lengths, args.variants, args.rounds, args.threads)
        print(table)
        if not args.no_write:
            note = (
                f"Gemma-3-270M fp32, one sequence, the model loaded once: a warm-up forward of "
                f"each variant, then {args.rounds} rounds in rotating order. Each round's time "
                f"is divided by the same round's plain SDPA forward; the table gives the median "
                f"and min-max of those paired ratios. torch threads = {args.threads}; 1-minute "
                f"load average {os.getloadavg()[0]:.1f} at the end."
            )
            write_section(
                "Long context, one process (CPU)",
                "python benchmarks/long_context.py --alternate",
                note + "\n\n" + table,
            )
        return
    if args.layer:
        table = layer_table(args.lengths, args.rounds, args.threads)
        print(table)
        return
    tmp = Path(tempfile.mkdtemp())
    lines = []
    for n in args.lengths:
        res: dict[str, list[dict]] = {v: [] for v in args.variants}
        for r in range(args.rounds):
            order = (
                args.variants[r % len(args.variants) :] + args.variants[: r % len(args.variants)]
            )
            for v in order:
                if v == "lens" and LENS_GB_PER_4K * (n / 4096) ** 2 > MEMORY_GB:
                    continue  # out of memory: stop TransformerLens here
                if v in ("lens", "analyze") and r > 0:
                    continue  # once per length
                got = run_child(__file__, [v, str(n), str(args.threads), str(tmp / f"{v}-{n}")])
                res[v].append(got)
                print(f"T={n} {v}: {got}", flush=True)
        plain = [g["seconds"] for g in res.get("plain", [])]
        ref = torch.load(tmp / f"default-{n}", weights_only=True) if res.get("default") else None
        for v in args.variants:
            if not res[v]:
                gb = LENS_GB_PER_4K * (n / 4096) ** 2
                lines.append(
                    f"| {n} | {v} | not run: needs about {gb:.0f} GB above the model | | | |"
                )
                continue
            secs = [g["seconds"] for g in res[v]]
            peak = max(g["peak_mb"] for g in res[v])
            ratio = (
                "" if not plain else f"{statistics.median(secs) / statistics.median(plain):.2f}x"
            )
            spread = (
                "" if not plain else f"{min(secs) / max(plain):.2f}-{max(secs) / min(plain):.2f}"
            )
            diff = ""
            if ref is not None and v not in ("plain", "analyze"):
                ours = torch.load(tmp / f"{v}-{n}", weights_only=True)
                diff = f"{max_rel_diff(ours, {k: ref[k] for k in ours}):.1e}"
            lines.append(
                f"| {n} | {v} | {fmt(secs)} | {ratio} | {spread} | {peak:.0f} MB | {diff} |"
            )
    table = "\n".join(
        [
            "| T | variant | time | / plain (median) | / plain (min-max) | peak above model | "
            "max rel. diff vs default |",
            "|---|---|---|---|---|---|---|",
            *lines,
        ]
    )
    print(table)
    if not args.no_write:
        load = os.getloadavg()[0]
        note = (
            f"Gemma-3-270M fp32 (18 layers: 15 sliding-window layers of 512 tokens, 3 global), one "
            f"sequence, all default metrics unless 'rows' (entropy, mean_distance, waad, "
            f"sink_mass, max_attention). Each run is a fresh process: model load, a 256-token "
            f"warm-up, one timed forward; rounds alternate the variants. torch threads = "
            f"{args.threads}; 1-minute load average {load:.1f} at the end. "
            f"Ratios divide by the plain SDPA forward's median of the same length; min-max "
            f"divides the extremes. Peak = RSS increase over the loaded model (10 ms sampling)."
        )
        write_section(
            "Long context (CPU)", "python benchmarks/long_context.py", note + "\n\n" + table
        )


if __name__ == "__main__":
    main()
