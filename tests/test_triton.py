"""Triton backend in the interpreter (TRITON_INTERPRET=1, set by conftest) against the dense
reference, every kernel variant of ``launch.VARIANTS`` against chunked (the fused forward's
variants: output against the float64 definition, statistics against the independent reference),
and the same variants on a CUDA GPU (``cuda`` tests, run by benchmarks/gpu_check.py). Small shapes
keep the interpreter fast."""

import dataclasses

import pytest
import torch
from independent import reference_output, reference_stats

from attnscope import kernels
from attnscope.errors import UnsupportedMetricError
from attnscope.kernels import backends, launch
from attnscope.kernels.fused import fused_attention
from attnscope.kernels.launch import GPU_VARIANTS, VARIANTS, Variant

triton_stats = pytest.importorskip("attnscope.kernels.triton_stats")

POISON = 12345.0


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output buffer starts full of a sentinel, so an element no kernel wrote shows up."""

    def alloc(*shape, device):
        return torch.full(shape, POISON, device=device)

    monkeypatch.setattr(triton_stats, "_alloc", alloc)


def assert_stats_close(got, ref, atol: float, rtol: float, label: str = "") -> None:
    """``got`` (the triton backend's stats) against ``ref`` (another backend's, or the float64
    reference's): the same statistics, every element written and close."""
    assert got.backend == "triton"
    assert got.rows.keys() == ref.rows.keys() and got.cols.keys() == ref.cols.keys()
    for kind, a, b in (("row", got.rows, ref.rows), ("col", got.cols, ref.cols)):
        for name in b:
            assert not (a[name] == POISON).any(), f"{label}{kind} {name}: unwritten elements"
            torch.testing.assert_close(
                a[name].double(),
                b[name].double(),
                atol=atol,
                rtol=rtol,
                equal_nan=True,
                msg=lambda m, n=name, t=kind: f"{label}{t} {n}: {m}",
            )
    torch.testing.assert_close(
        got.lse.double(), ref.lse.double(), atol=atol, rtol=rtol, equal_nan=True
    )


def compare(q, k, atol=1e-4, rtol=1e-4, reference="dense", label="", **kwargs):
    """Triton against ``reference`` on the same request: every element written and close."""
    got = kernels.attention_stats(q, k, backend="triton", **kwargs)
    assert_stats_close(
        got, kernels.attention_stats(q, k, backend=reference, **kwargs), atol, rtol, label
    )
    return got


CASES = {
    "odd-L": dict(b=1, hq=2, hkv=2, tq=45, tk=45, d=16),
    "gqa-4to1": dict(b=2, hq=4, hkv=1, tq=70, tk=70, d=32),
    "head-dim-24": dict(b=1, hq=2, hkv=1, tq=33, tk=33, d=24),
    "sliding": dict(b=1, hq=2, hkv=1, tq=100, tk=100, d=16, sliding_window=9),
    "softcap": dict(b=1, hq=2, hkv=2, tq=40, tk=40, d=16, softcap=4.0),
    "cross-Lq-ne-Lk": dict(b=1, hq=2, hkv=2, tq=19, tk=75, d=16, causal=False),
    "decode-rows": dict(b=1, hq=4, hkv=2, tq=3, tk=66, d=16),
    "spans-fai-rows": dict(
        b=1,
        hq=2,
        hkv=1,
        tq=64,
        tk=64,
        d=16,
        sink_tokens=3,
        window=4,
        spans={"img": (5, 21), "tail": (50, 64)},
        fai_horizon=(2, 8),
        fai_rows=(20, 64),
    ),
    "fai-no-horizon": dict(b=1, hq=2, hkv=1, tq=50, tk=50, d=16, fai_horizon=None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_matches_dense_fp32(case):
    case = dict(case)
    b, hq, hkv, tq, tk, d = (case.pop(x) for x in ("b", "hq", "hkv", "tq", "tk", "d"))
    q, k = torch.randn(b, hq, tq, d) * 2, torch.randn(b, hkv, tk, d) * 2
    compare(q, k, **case)


def test_triton_padding_and_fully_masked_rows():
    q, k = torch.randn(2, 4, 48, 16), torch.randn(2, 1, 48, 16)
    key_valid = torch.ones(2, 48, dtype=torch.bool)
    key_valid[1, :13] = False  # left padding: the first 13 rows see nothing
    got = compare(q, k, mask=key_valid)
    assert got.rows["entropy"][1, :, :13].isnan().all()
    assert not got.rows["entropy"][0].isnan().any()
    full = torch.ones(1, 4, 30, 30, dtype=torch.bool).tril()
    full[0, 2, 5] = False  # one row of one head masked entirely
    got = compare(q[:1, :, :30], k[:1, :, :30], mask=full)
    assert got.rows["waad"][0, 2, 5].isnan() and not got.rows["waad"][0, 1, 5].isnan()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_inputs(dtype):
    q, k = torch.randn(1, 4, 40, 16).to(dtype), torch.randn(1, 2, 40, 16).to(dtype)
    got = compare(q, k, atol=1e-3, rtol=2e-2)
    assert got.rows["entropy"].dtype == torch.float32


def test_triton_refuses_without_cuda_or_interpreter(monkeypatch):
    triton = backends.BACKENDS["triton"]
    on_cuda_only = dataclasses.replace(triton.capabilities, devices=frozenset({"cuda"}))
    monkeypatch.setitem(
        backends.BACKENDS, "triton", dataclasses.replace(triton, capabilities=on_cuda_only)
    )
    with pytest.raises(UnsupportedMetricError, match="device cpu"):
        kernels.attention_stats(
            torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16), backend="triton"
        )


def test_triton_too_many_spans():
    spans = {f"s{i}": (i % 4, i % 4 + 1) for i in range(16)}
    with pytest.raises(UnsupportedMetricError, match="more than 15 spans"):
        kernels.attention_stats(
            torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16), backend="triton", spans=spans
        )


def check_variant(variant: Variant, device: str, length: int) -> None:
    """One kernel variant on ``device``, every element written: triton against chunked. A fused
    variant (``value``): its output ``[B, Hq, L, D]`` against softmax(q k^T) v in float64 and
    its statistics against the independent float64 reference (on CUDA, where that is too slow
    at these lengths, against chunked)."""
    q, k, v, kwargs = variant.inputs(length, device)
    on_gpu = device != "cpu" and not triton_stats.INTERPRET
    half = q.dtype != torch.float32
    # the interpreter computes in fp32 from the inputs, as chunked does; on the GPU half inputs
    # meet tf32 span sums, fp32 inputs tf32x3 scores
    atol, rtol = (2e-3, 2e-2) if on_gpu and half else (2e-4, 1e-3)
    label = f"{variant.name} "
    if v is None:
        compare(q, k, atol, rtol, reference="chunked", label=label, **kwargs)
        return
    out, got = fused_attention(q, k, v, backend="triton", **kwargs)
    # the references take key padding [B, L] and a full mask [B, 1|Hq, L, L] apart
    opts = dict(kwargs)
    if (mask := opts.pop("mask", None)) is not None:
        opts["key_valid" if mask.dim() == 2 else "mask"] = mask
    if on_gpu:  # the float64 reference is too slow at these lengths
        ref = kernels.attention_stats(q, k, backend="chunked", **kwargs)
    else:
        ref = reference_stats(q, k, **opts)
    assert_stats_close(got, ref, atol, rtol, label)
    # the output is rounded to q's dtype; on the GPU P is rounded to it for P @ V
    out_tol = 2e-2 if half else 1e-4 if on_gpu else 1e-5
    want = reference_output(q, k, v, **opts)
    assert out.dtype == q.dtype and out.shape == want.shape
    torch.testing.assert_close(
        out.double(), want, atol=out_tol, rtol=out_tol, msg=lambda m: f"{label}output: {m}"
    )


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_variant_in_interpreter(variant):
    """Every variant the compile check builds for sm_80 / sm_90 also computes the right numbers
    (the fused forward's at 64 tokens: four key tiles, so a sliding window has tiles it sees
    entirely)."""
    check_variant(variant, "cpu", 64 if variant.value else 40)


@pytest.mark.cuda
@pytest.mark.parametrize("length", [400, 4096])
@pytest.mark.parametrize("variant", GPU_VARIANTS, ids=[v.name for v in GPU_VARIANTS])
def test_variant_on_cuda(variant, length):
    """What the autotuner picks, at two length classes."""
    check_variant(variant, "cuda", length)


@pytest.mark.cuda
@pytest.mark.parametrize("choice", [0, 1])
@pytest.mark.parametrize("variant", GPU_VARIANTS, ids=[v.name for v in GPU_VARIANTS])
def test_every_candidate_on_cuda(variant, choice, monkeypatch):
    """Each launch configuration of the table computes the right numbers, whichever the
    autotuner would pick (the first and the second candidate of each pass)."""

    def only(kind, *args):
        configs = launch.candidates(kind, *args)
        return (configs[min(choice, len(configs) - 1)],)

    monkeypatch.setattr(triton_stats, "candidates", only)
    check_variant(variant, "cuda", 400)


@pytest.mark.cuda
def test_auto_picks_triton_on_cuda():
    q, k, _, _ = VARIANTS[0].inputs(256, "cuda")
    stats = kernels.attention_stats(q, k)
    assert stats.backend == "triton", stats.reason
    bias = torch.zeros(1, 1, 256, 256, device="cuda")
    bias[..., 0] = 1.0  # an intervention's score bias: only chunked serves it
    stats = kernels.attention_stats(q, k, mask=bias)
    assert stats.backend == "chunked" and "score bias" in stats.reason, stats.reason
