"""attention_stats backends on one attention layer: time and peak memory, as ratios.

CPU: chunked vs dense (materialised softmax + reference metrics) for the Gemma-3-270M layer shape
(Hq 4, Hkv 1, d 256, causal, fp32). GPU figures (triton vs a FlashAttention-style forward and
eager) need a CUDA machine and come with the triton backend.

    python benchmarks/kernels.py [--lengths 512 1024 2048 4096] [--reps 3]
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
