"""The day a GPU is lent: validate and measure the fused Triton kernels in minutes.

On CUDA (under 8 minutes on one H100 / H200):
  1. compile every kernel variant for this GPU in parallel processes (benchmarks/triton_compile.py:
     shared memory and spills checked, and the later steps find the kernels in the Triton cache);
  2. the ``cuda`` tests (``pytest -m cuda``): every variant of ``attnscope.kernels.launch.VARIANTS``
     against chunked on the GPU, in its dtype and the feature variants again in fp32 (the fused
     forward's variants: output against softmax(q k^T) v in float64 too);
  3. a tiny Llama captured on the GPU with triton and with chunked: plain, under an attention edit
     the kernels serve as a mask (SinkSuppression), and under one that adds a score bias, where
     ``auto`` must pick chunked and say so; then with the fused forward (``exact_logits=False``):
     logits against the model's own (SDPA) and statistics against the exact capture;
  4. the fused forward on one layer (Llama-3-8B causal; Gemma-3-4B sliding: Hq 8, Hkv 4, d 256,
     window 1024), bf16, 1K to 16K tokens: output against an fp32 reference (within twice SDPA's
     own error), statistics against chunked, time against the SDPA forward alone and against
     SDPA + the triton statistics (the exact capture), written to RESULTS.md;
  5. the GPU table of benchmarks/kernels.py (Llama-3-8B layer: Hq 32, Hkv 8, d 128, bf16, causal,
     1K to 128K tokens; TFLOP/s by FlashAttention's count), written to RESULTS.md.
Without CUDA the same code runs on the CPU so CI keeps it working: the variant checks, the
capture and the fused forward in the Triton interpreter, the tables at a toy length (not
written), the compile step skipped (tests/test_triton_compile.py compiles for sm_80 / sm_90
without a GPU). A summary says what ran, what was skipped and what failed; the exit status is 0
when nothing failed.

    python benchmarks/gpu_check.py [--quick]     # --quick: a CPU-size subset (CI)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import triton_compile  # noqa: E402  (benchmarks/ is not a package)
from harness import max_rel_diff, write_section  # noqa: E402

CUDA = torch.cuda.is_available()
# before anything imports triton: real kernels on CUDA, the interpreter elsewhere; one cache
os.environ["TRITON_INTERPRET"] = "0" if CUDA else "1"
os.environ.setdefault("TRITON_CACHE_DIR", str(triton_compile.CACHE))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
DEVICE = torch.device("cuda" if CUDA else "cpu")
QUICK_VARIANTS = ("causal-bf16-d128", "gqa-8to1", "full-mask", "sinks", "fused-bf16-d256")


def compile_kernels(quick: bool) -> tuple[str, str]:
    if not CUDA:
        return "skipped", "no CUDA (tests/test_triton_compile.py compiles for sm_80 / sm_90)"
    major, minor = torch.cuda.get_device_capability()
    target = major * 10 + minor
    shared = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    records, wall = triton_compile.compile_all([target], os.cpu_count() or 1, "gpu")
    bad = triton_compile.problems(records, {target: shared})
    print(triton_compile.table(records))
    for line in bad:
        print("PROBLEM", line)
    return ("failed" if bad else "ok"), f"{len(records)} kernels for sm_{target} in {wall:.0f} s"


def variant_tests(quick: bool) -> tuple[str, str]:
    """The variant checks through pytest: every ``cuda`` test on the GPU, the interpreter ones of
    tests/test_triton.py here."""
    if CUDA:
        select = ["-m", "cuda"]
    else:
        names = f" and ({' or '.join(QUICK_VARIANTS)})" if quick else ""
        select = ["tests/test_triton.py", "-k", f"test_variant_in_interpreter{names}"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *select]
    proc = subprocess.run(cmd, cwd=ROOT, env=os.environ, capture_output=True, text=True)
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    lines = proc.stdout.strip().splitlines()
    where = "on CUDA" if CUDA else "in the interpreter, L = 40, fused forward 64"
    return ("ok" if proc.returncode == 0 else "failed"), f"{lines[-1] if lines else '?'} ({where})"


def capture_check(quick: bool) -> tuple[str, str]:
    """A tiny Llama on DEVICE: triton and chunked agree, plain and under a masking edit; an edit
    with a finite score bias makes ``auto`` take chunked and say why."""
    import attnscope as asc
    from attnscope.errors import UnsupportedMetricError
    from attnscope.interventions import SinkSuppression

    lm = asc.load("tiny-llama")
    model = lm.model.to(DEVICE).eval()
    text = "The quick brown fox jumps over the lazy dog near the river bank. " * (2 if quick else 6)
    ids = lm.tokenizer(text, return_tensors="pt").input_ids.to(DEVICE)
    layers = model.config.num_hidden_layers

    def traced(backend: str, edit=None):
        with (
            torch.no_grad(),
            edit.applied(model) if edit else nullcontext(),
            asc.capture(model, backend=backend) as cap,
        ):
            model(ids)
        return cap.trace, cap.backends

    worst = 0.0
    exact = None  # the plain triton capture
    for edit in (None, SinkSuppression(tokens=[0, 3], end=layers)):
        got, ran = traced("triton", edit)
        want, _ = traced("chunked", edit)
        assert list(ran) == ["triton"], ran
        worst = max(worst, max_rel_diff({**got.rows, **got.cols}, {**want.rows, **want.cols}))
        if edit is None:
            exact = got
    assert worst < 2e-4, f"triton and chunked captures differ by {worst:.1e} (relative)"
    with torch.no_grad():  # the fused forward: the kernel computes each layer's output too
        plain = model(ids).logits
        with asc.capture(model, backend="triton", exact_logits=False) as cap:
            logits = model(ids).logits
    assert "fused forward" in cap.backends.get("triton", ""), cap.backends
    logit_diff = float((logits - plain).abs().max())
    assert logit_diff < 1e-4, f"fused logits differ from the model's by {logit_diff:.1e}"
    fused_diff = max_rel_diff({**cap.trace.rows, **cap.trace.cols}, {**exact.rows, **exact.cols})
    assert fused_diff < 2e-4, f"fused and exact captures differ by {fused_diff:.1e} (relative)"
    biased = SinkSuppression(tokens=[0], redirect_to=[1, 2], end=layers)  # finite biases
    try:
        traced("triton", biased)
        raise AssertionError("the triton backend accepted a score bias")
    except UnsupportedMetricError as e:
        assert "score bias" in str(e), e
    _, ran = traced("auto", biased)
    assert list(ran) == ["chunked"], ran
    assert not CUDA or "score bias" in ran["chunked"], ran  # on the CPU: triton is not fast
    return "ok", (
        f"tiny-llama, {ids.shape[1]} tokens on {DEVICE.type}: triton = chunked to {worst:.1e} "
        f"(plain and SinkSuppression); fused forward: logits = model's to {logit_diff:.1e}, "
        f"stats = exact capture's to {fused_diff:.1e}; with a score bias auto said: "
        f"{ran['chunked']}"
    )


# The fused forward on one layer: (Hq, Hkv, d, sliding window), bf16
FUSED_SHAPES = {"Llama-3-8B causal": (32, 8, 128, None), "Gemma-3-4B sliding": (8, 4, 256, 1024)}
FUSED_LENGTHS = [1024, 4096, 16384]
CHECKED_MAX = 4096  # lengths checked against the fp32 reference and chunked (memory O(L^2))
FUSED_SECTION = "Fused forward (GPU)"
FUSED_NOTE = (
    "`fused_attention(q, k, v, backend='triton')` (the capture's `exact_logits=False`: the row "
    "kernel accumulates P @ V) on one layer, bf16, all metrics unless 'rows'; "
    "triton.testing.do_bench medians in ms. SDPA = the model's own forward (flash; the "
    "efficient kernel with a mask for the sliding window); exact = SDPA + the triton statistics "
    "(the default capture). err = max |output - fp32 reference| (L <= 4096), fused and SDPA."
)


def _fused_row(shape: str, n: int) -> str:
    """One table row: the fused forward at length ``n``, checked (n <= CHECKED_MAX) and timed."""
    import kernels  # benchmarks/kernels.py: the timing helper of the GPU table

    from attnscope.kernels import ROW_METRICS, attention_stats
    from attnscope.kernels.fused import fused_attention

    hq, hkv, d, window = FUSED_SHAPES[shape]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (
        torch.randn(1, h, n, d, device=DEVICE, dtype=torch.bfloat16, generator=g)
        for h in (hq, hkv, hkv)
    )
    kk, vv = (x.repeat_interleave(hq // hkv, 1) for x in (k, v))  # [1, Hq, n, d] for SDPA
    i = torch.arange(n, device=DEVICE)
    mask = (
        None if window is None else (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    )
    backend = torch.nn.attention.SDPBackend
    kernel = backend.FLASH_ATTENTION if mask is None else backend.EFFICIENT_ATTENTION
    if not CUDA:
        kernel = backend.MATH

    def sdpa(x=q, key=kk, value=vv, kind=None):
        with torch.nn.attention.sdpa_kernel(kernel if kind is None else kind):
            return torch.nn.functional.scaled_dot_product_attention(
                x, key, value, attn_mask=mask, is_causal=mask is None
            )

    fallback = ""
    try:
        sdpa()
    except RuntimeError:  # this build's kernel refuses the shape: the math one, said in the table
        kernel, fallback = backend.MATH, " (math)"

    def fused(metrics=None):
        return fused_attention(q, k, v, backend="triton", sliding_window=window, metrics=metrics)

    err = "-"
    if n <= CHECKED_MAX:
        out, stats = fused()
        ref = sdpa(q.float(), kk.float(), vv.float(), backend.MATH)
        err_fused, err_sdpa = (float((x.float() - ref).abs().max()) for x in (out, sdpa()))
        assert err_fused <= 2 * err_sdpa + 1e-3, (
            f"{shape} L {n}: fused output off by {err_fused:.1e} (SDPA {err_sdpa:.1e})"
        )
        want = attention_stats(q, k, backend="chunked", sliding_window=window)
        diff = max_rel_diff({**stats.rows, **stats.cols}, {**want.rows, **want.cols})
        assert diff < 2e-2, f"{shape} L {n}: fused stats differ from chunked by {diff:.1e}"
        err = f"{err_fused:.1e} / {err_sdpa:.1e}"
        del out, stats, ref, want

    def exact():
        sdpa()
        attention_stats(q, k, backend="triton", sliding_window=window)

    t_fused, mem = kernels._timed(fused, DEVICE)
    t_rows, _ = kernels._timed(lambda: fused(ROW_METRICS), DEVICE)
    t_sdpa, _ = kernels._timed(sdpa, DEVICE)
    t_exact, _ = kernels._timed(exact, DEVICE)

    def cell(ms):
        return "OOM" if ms is None else f"{ms:.2f} ms"

    def div(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}x"

    peak = "-" if mem is None else f"{mem:.2f}"
    return (
        f"| {shape} | {n} | {cell(t_fused)} | {cell(t_rows)} | {cell(t_sdpa)}{fallback} "
        f"| {cell(t_exact)} "
        f"| {div(t_fused, t_sdpa)} | {div(t_fused, t_exact)} | {err} | {peak} |"
    )


def fused_forward(quick: bool) -> tuple[str, str]:
    """The fused forward against SDPA: output, statistics and time (step 4)."""
    lengths = FUSED_LENGTHS if CUDA else [32 if quick else 64]
    rows = [
        "| layer | L | fused | fused rows | SDPA fwd | exact (SDPA + stats) | fused / SDPA | "
        "fused / exact | err fused / SDPA | peak GiB (fused) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in FUSED_SHAPES:
        for n in lengths:
            rows.append(_fused_row(shape, n))
            print(rows[-1], flush=True)
            if CUDA:
                torch.cuda.empty_cache()
    if not CUDA:
        return "ok", "CPU smoke run in the interpreter (times meaningless; RESULTS.md untouched)"
    write_section(
        FUSED_SECTION, "python benchmarks/gpu_check.py", FUSED_NOTE + "\n\n" + "\n".join(rows)
    )
    return "ok", f"{len(FUSED_SHAPES)} layers x {len(lengths)} lengths; RESULTS.md"


def benchmark_table(quick: bool) -> tuple[str, str]:
    import kernels

    if not CUDA:
        kernels.gpu_table([32 if quick else 64], DEVICE)
        return "ok", "CPU smoke run in the interpreter (times meaningless; RESULTS.md untouched)"
    table = kernels.gpu_table(kernels.GPU_LENGTHS, DEVICE)
    kernels.write_gpu_table(table, "python benchmarks/gpu_check.py")
    return "ok", f"{len(kernels.GPU_LENGTHS)} lengths on {torch.cuda.get_device_name()}; RESULTS.md"


STEPS: dict[str, Callable[[bool], tuple[str, str]]] = {
    "compile": compile_kernels,
    "variants": variant_tests,
    "capture": capture_check,
    "fused": fused_forward,
    "table": benchmark_table,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a CPU-size subset (CI)")
    args = parser.parse_args()
    start = time.perf_counter()
    summary = []
    for name, step in STEPS.items():
        print(f"== {name}", flush=True)
        began = time.perf_counter()
        try:
            status, detail = step(args.quick)
        except Exception as e:  # report the failure, run the other steps
            status, detail = "failed", f"{type(e).__name__}: {e}"
        summary.append(f"{name:9s} {status:8s} {time.perf_counter() - began:5.0f} s  {detail}")
    failed = sum(" failed " in line for line in summary)
    print("\nSUMMARY (" + ("CUDA: " + torch.cuda.get_device_name() if CUDA else "no CUDA") + ")")
    print("\n".join(summary))
    elapsed = time.perf_counter() - start
    print(f"gpu_check: {failed} step(s) failed, {elapsed:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
