"""attention_stats backends on one attention layer: time and peak memory, as ratios.

CPU: chunked vs dense (materialised softmax + reference metrics) for the Gemma-3-270M layer shape
(Hq 4, Hkv 1, d 256, causal, fp32).
GPU (when CUDA is available; benchmarks/gpu_check.py runs the same table): the Llama-3-8B layer
shape (Hq 32, Hkv 8, d 128, causal, bf16), 1K to 128K tokens: triton rows only, triton rows +
columns, an SDPA flash forward of the same shape, and eager (materialised probabilities + dense
metrics), with triton.testing.do_bench, and TFLOP/s by FlashAttention's count.

    python benchmarks/kernels.py [--lengths ...] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import fmt_time, max_rel_diff, measure, ratio, run_child, write_section

SHAPE = dict(hq=4, hkv=1, d=256)


def child(backend: str, n: int, reps: int, out: str) -> None:
    from attnscope.kernels import attention_stats

    torch.set_num_threads(os.cpu_count() or 1)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, SHAPE["hq"], n, SHAPE["d"], generator=g)
    k = torch.randn(1, SHAPE["hkv"], n, SHAPE["d"], generator=g)

    def work():
        st = attention_stats(q, k, backend=backend)
        return {**st.rows, **st.cols}

    result = measure(work, reps)
    torch.save(result.pop("result"), out)
    print(json.dumps(result))


GPU_SHAPE = dict(hq=32, hkv=8, d=128)
GPU_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
EAGER_MAX = 32768  # materialising beyond this certainly exceeds the memory of one GPU
GPU_SECTION = "attention_stats backends (GPU)"
GPU_NOTE = (
    "Llama-3-8B layer shape (Hq 32, Hkv 8, d 128), causal, bf16, all metrics; "
    "triton.testing.do_bench medians in ms; TFLOP/s = 2 B H L^2 D / time (FlashAttention's count "
    "for a causal forward; published H100 rates at 8-16K: FA2 ~333, Triton tutorial ~369, FA3 "
    "~602). Goals (KERNELS.md): rows + cols <= 1.5x the flash forward (stretch 1.2x), rows <= "
    "0.8x, >= 7x faster than eager; peak = memory allocated above the inputs."
)


def _timed(fn, device: torch.device) -> tuple[float | None, float | None]:
    """Median ms and peak GiB allocated above the inputs; (None, None) when out of memory. On
    the CPU (the Triton interpreter: a smoke run of the same code) one call after a warm-up."""
    if device.type != "cuda":
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3, None
    from triton.testing import do_bench

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        ms = do_bench(fn, warmup=25, rep=100)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**30


def _layer_row(n: int, device: torch.device) -> str:
    """One table row at length n: triton rows, triton rows + cols, SDPA flash forward, eager."""
    from attnscope.kernels import ROW_METRICS, attention_stats

    g = torch.Generator(device=device).manual_seed(0)
    hq, hkv, d = GPU_SHAPE["hq"], GPU_SHAPE["hkv"], GPU_SHAPE["d"]
    q = torch.randn(1, hq, n, d, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, hkv, n, d, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    m = min(n, 512)  # same values first: triton against chunked on a prefix
    got = attention_stats(q[:, :, :m], k[:, :, :m], backend="triton")
    ref = attention_stats(q[:, :, :m], k[:, :, :m], backend="chunked")
    diff = max_rel_diff({**got.rows, **got.cols}, {**ref.rows, **ref.cols})
    assert diff < 2e-2, f"triton disagrees with chunked at L = {m} (rel. diff {diff:.1e})"
    sdpa = torch.nn.functional.scaled_dot_product_attention
    backend = torch.nn.attention.SDPBackend
    kernel = backend.FLASH_ATTENTION if device.type == "cuda" else backend.MATH

    kv = {"key": k, "value": v, "enable_gqa": True}

    def flash():
        with torch.nn.attention.sdpa_kernel(kernel):
            sdpa(q, is_causal=True, **kv)

    try:
        flash()
    except RuntimeError:  # a flash build without GQA: give it the repeated heads
        kv = {"key": k.repeat_interleave(hq // hkv, 1), "value": v.repeat_interleave(hq // hkv, 1)}

    t_rows, _ = _timed(lambda: attention_stats(q, k, backend="triton", metrics=ROW_METRICS), device)
    t_all, mem = _timed(lambda: attention_stats(q, k, backend="triton"), device)
    t_flash, _ = _timed(flash, device)
    t_eager = None
    if n <= EAGER_MAX:
        t_eager, _ = _timed(lambda: attention_stats(q, k, backend="dense"), device)
    flops = 2 * hq * n * n * d

    def cell(ms):
        return "OOM" if ms is None else f"{ms:.2f} ms"

    def div(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}x"

    def rate(ms):
        return "-" if ms is None else f"{flops / ms / 1e9:.0f}"

    rates = " / ".join(rate(t) for t in (t_rows, t_all, t_flash))
    peak = "-" if mem is None else f"{mem:.2f}"
    return (
        f"| {n} | {cell(t_rows)} | {cell(t_all)} | {cell(t_flash)} | {cell(t_eager)} | "
        f"{div(t_rows, t_flash)} | {div(t_all, t_flash)} | {div(t_eager, t_all)} | {rates} "
        f"| {peak} |"
    )


def gpu_table(lengths: list[int], device: torch.device) -> str:
    """Triton vs flash forward vs eager at each length, ratios from one run (KERNELS.md goals).
    On the CPU the same code runs in the Triton interpreter at toy lengths (times meaningless)."""
    rows = [
        "| L | triton rows | triton rows+cols | flash fwd (SDPA) | eager + metrics | "
        "rows / flash | all / flash | eager / all | TFLOP/s rows / all / flash | peak GiB (all) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in lengths:
        rows.append(_layer_row(n, device))
        print(rows[-1], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return "\n".join(rows)


def write_gpu_table(table: str, command: str) -> None:
    write_section(GPU_SECTION, command, GPU_NOTE + "\n\n" + table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--child", nargs=4, metavar=("BACKEND", "T", "REPS", "OUT"))
    args = parser.parse_args()
    if args.child:
        backend, n, reps, out = args.child
        child(backend, int(n), int(reps), out)
        return
    if torch.cuda.is_available():
        table = gpu_table(GPU_LENGTHS, torch.device("cuda"))
        write_gpu_table(table, "python benchmarks/kernels.py")
    tmp = Path(tempfile.mkdtemp())
    rows = [
        "| L | chunked time | dense time | dense / chunked time | chunked peak | dense peak "
        "| memory ratio | max rel. diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in args.lengths:
        res = {
            b: run_child(__file__, [b, str(n), str(args.reps), str(tmp / b)])
            for b in ("chunked", "dense")
        }
        ours = torch.load(tmp / "chunked", weights_only=True)
        ref = torch.load(tmp / "dense", weights_only=True)
        diff = max_rel_diff(ours, ref)
        c, d = res["chunked"], res["dense"]
        rows.append(
            f"| {n} | {fmt_time(c['times'])} | {fmt_time(d['times'])} | "
            f"{ratio(c['times'], d['times'])} | {c['peak_mb']:.0f} MB | {d['peak_mb']:.0f} MB | "
            f"{d['peak_mb'] / max(c['peak_mb'], 1):.1f}x | {diff:.1e} |"
        )
        print(rows[-1], flush=True)
    note = (
        f"One layer, Hq {SHAPE['hq']}, Hkv {SHAPE['hkv']}, d {SHAPE['d']}, causal, fp32, all "
        f"metrics (rows + columns). Median of {args.reps} after a warm-up (min-max); peak = "
        f"RSS increase over the inputs, sampled every 10 ms; torch threads = {os.cpu_count()}. "
        "GPU figures (triton backend) are pending a GPU machine."
    )
    table = "\n".join(rows)
    print(table)
    write_section(
        "attention_stats backends (CPU)", "python benchmarks/kernels.py", note + "\n\n" + table
    )


if __name__ == "__main__":
    main()
