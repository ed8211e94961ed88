"""attention_stats backends on one attention layer: time and peak memory, as ratios.

CPU: chunked vs dense (materialised softmax + reference metrics) for the Gemma-3-270M layer shape
(Hq 4, Hkv 1, d 256, causal, fp32).
GPU (when CUDA is available): the Llama-3-8B layer shape (Hq 32, Hkv 8, d 128, causal, bf16):
triton rows only, triton rows + columns, an SDPA flash forward of the same shape, and eager
(materialised probabilities + dense metrics), with triton.testing.do_bench.

    python benchmarks/kernels.py [--lengths ...] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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


def _gpu_timed(fn) -> tuple[float | None, float | None]:
    """do_bench median (ms) and peak GiB allocated above the inputs; (None, None) on OOM."""
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


def _gpu_row(n: int) -> str:
    """One table row: triton rows, triton all, SDPA flash forward, eager at length n."""
    from attnscope.kernels import ROW_METRICS, attention_stats

    g = torch.Generator(device="cuda").manual_seed(0)
    shape = GPU_SHAPE
    q = torch.randn(1, shape["hq"], n, shape["d"], device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(
        1, shape["hkv"], n, shape["d"], device="cuda", dtype=torch.bfloat16, generator=g
    )
    v = torch.randn_like(k)
    got = attention_stats(q[:, :, :256], k[:, :, :256], backend="triton")
    ref = attention_stats(q[:, :, :256], k[:, :, :256], backend="dense")
    diff = max_rel_diff({**got.rows, **got.cols}, {**ref.rows, **ref.cols})
    assert diff < 2e-2, f"triton disagrees with dense (rel. diff {diff:.1e})"

    def flash():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            )

    t_rows, _ = _gpu_timed(lambda: attention_stats(q, k, backend="triton", metrics=ROW_METRICS))
    t_all, mem_all = _gpu_timed(lambda: attention_stats(q, k, backend="triton"))
    t_flash, _ = _gpu_timed(flash)
    t_eager = None
    if n <= 32768:  # materialising beyond this certainly exceeds 80 GB
        t_eager, _ = _gpu_timed(lambda: attention_stats(q, k, backend="dense"))
    flops = 2 * shape["hq"] * n * n * shape["d"]

    def cell(ms):
        return "OOM" if ms is None else f"{ms:.2f} ms"

    def div(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}x"

    tflops = "-" if t_flash is None else f"{flops / t_flash / 1e9:.0f}"
    mem = "-" if mem_all is None else f"{mem_all:.2f}"
    return (
        f"| {n} | {cell(t_rows)} | {cell(t_all)} | {cell(t_flash)} | {cell(t_eager)} | "
        f"{div(t_rows, t_flash)} | {div(t_all, t_flash)} | {div(t_eager, t_all)} | {tflops} "
        f"| {mem} |"
    )


def gpu_table() -> str:
    """Triton vs flash forward vs eager on the GPU; ratios from one run (do_bench medians)."""
    rows = [
        "| L | triton rows | triton rows+cols | flash fwd (SDPA) | eager + metrics | "
        "rows / flash | all / flash | eager / all | TFLOP/s flash | peak GiB (all) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in GPU_LENGTHS:
        rows.append(_gpu_row(n))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    return "\n".join(rows)


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
        table = gpu_table()
        write_section(
            "attention_stats backends (GPU)",
            "python benchmarks/kernels.py",
            "Llama-3-8B layer shape (Hq 32, Hkv 8, d 128), causal, bf16, all metrics; "
            "do_bench medians; goals: rows+cols <= 1.5x flash at 8K, rows <= 0.8x, "
            ">= 7x faster than eager.\n\n" + table,
        )
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
