"""Every backend of ``attention_stats`` against the float64 reference in tests/independent.py.

The dense backend shares masking, scoring and FAI row selection with the chunked one, so comparing
the two cannot catch a bug there; the reference re-derives everything from METRICS.md. float64
inputs must give float64 statistics exact to float64 rounding (dense, chunked); float32 inputs
match to 1e-4 (dense, chunked, and triton under the interpreter, which computes in fp32). Cases
named ``sinks*`` add learned per-head sink logits (gpt-oss).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from independent import Reference, reference_stats
from torch import Tensor

from attnscope import kernels, metrics
from attnscope.kernels.chunked import chunked_stats
from attnscope.kernels.request import build_request

# float64 statistics agree with the reference to rounding (~1e-13); any float32 step on the way
# shows as errors of 1e-8 to 1e-6, so the float64 bound is far below 1e-6 on purpose
F64_TOL = 1e-10
F32_TOL = 1e-4

# (b, hq, hkv, tq, tk, d) and keyword arguments shared by attention_stats and the reference;
# "pad" (left padding per sequence), "mask" and "bias" say which masks the case builds; "sinks"
# adds learned sink logits randn * 2 + that offset.
CASES: dict[str, dict] = {
    "causal": dict(shape=(2, 2, 2, 40, 40, 8)),
    "left-padding": dict(shape=(2, 2, 1, 36, 36, 8), pad=(0, 7), fai_horizon=(1, 6)),
    "mask-per-head": dict(shape=(1, 3, 1, 28, 28, 8), mask="per-head"),
    "mask-broadcast-noncausal": dict(shape=(2, 2, 2, 20, 20, 8), mask="shared", causal=False),
    "sliding": dict(shape=(1, 2, 1, 45, 45, 8), sliding_window=7, fai_horizon=(2, 12)),
    "softcap": dict(shape=(1, 2, 2, 30, 30, 8), softcap=3.0, amp=4.0),
    "gqa-4to1": dict(shape=(2, 4, 1, 33, 33, 16)),
    "gqa-6to2": dict(shape=(1, 6, 2, 26, 26, 8), fai_horizon=(1, 5)),
    "cross": dict(shape=(1, 2, 2, 9, 37, 8), causal=False, fai_horizon=None),
    "decode-1": dict(shape=(2, 4, 2, 1, 41, 8), fai_horizon=(0, 3)),
    "decode-3": dict(shape=(1, 2, 1, 3, 41, 8), fai_horizon=(1, 40)),
    "positions": dict(shape=(1, 2, 1, 30, 30, 8), positions=True, fai_horizon=(2, 9)),
    "spans": dict(
        shape=(1, 2, 2, 40, 40, 8),
        spans={"img": (3, 17), "tail": (30, 40), "empty": (5, 5)},
        sink_tokens=3,
        window=4,
    ),
    "fai-rows": dict(shape=(2, 2, 1, 40, 40, 8), fai_rows=(15, 36), fai_horizon=(2, 9)),
    "fai-no-horizon": dict(shape=(1, 2, 1, 35, 35, 8), fai_horizon=None, fai_rows=(10, 35)),
    "bias": dict(shape=(1, 2, 1, 24, 24, 8), bias=True),
    "fully-masked-rows": dict(shape=(2, 3, 1, 24, 24, 8), mask="masked-rows", pad=(0, 5)),
    "sinks": dict(shape=(2, 4, 2, 30, 30, 8), sinks=0.0, fai_horizon=(1, 8)),
    "sinks-dominant": dict(shape=(1, 2, 1, 25, 25, 8), sinks=8.0, amp=1.0),
    "sinks-sliding-padding": dict(
        shape=(2, 2, 1, 36, 36, 8), sinks=1.0, pad=(0, 5), sliding_window=6, fai_horizon=(1, 6)
    ),
    "sinks-masked-rows": dict(
        shape=(2, 3, 1, 24, 24, 8), sinks=0.0, mask="masked-rows", pad=(0, 5)
    ),
    "sinks-softcap-bias": dict(shape=(1, 2, 2, 24, 24, 8), sinks=0.5, softcap=3.0, bias=True),
    "sinks-decode": dict(shape=(2, 4, 2, 1, 41, 8), sinks=-1.0, fai_horizon=(0, 3)),
    "sinks-cross-spans": dict(
        shape=(1, 2, 2, 9, 37, 8), sinks=0.0, causal=False, spans={"a": (4, 20)}, sink_tokens=2
    ),
}


def build(name: str, dtype: torch.dtype) -> tuple[Tensor, Tensor, dict, dict]:
    """Seeded inputs of one case: ``q, k`` and the keyword arguments of attention_stats and of
    the reference (the same statistics, each API's way of saying it)."""
    case = dict(CASES[name])
    b, hq, hkv, tq, tk, d = case.pop("shape")
    pad, mask_kind = case.pop("pad", None), case.pop("mask", None)
    with_bias, with_positions = case.pop("bias", False), case.pop("positions", False)
    sink_offset = case.pop("sinks", None)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    amp = case.pop("amp", 2.0)
    q = (torch.randn(b, hq, tq, d, generator=g, dtype=torch.float64) * amp).to(dtype)
    k = (torch.randn(b, hkv, tk, d, generator=g, dtype=torch.float64) * amp).to(dtype)
    api, ref = dict(case), dict(case)
    if pad is not None:
        key_valid = torch.ones(b, tk, dtype=torch.bool)
        for i, n in enumerate(pad):
            key_valid[i, :n] = False
        api["mask"] = ref["key_valid"] = key_valid
    if mask_kind is not None:
        heads = 1 if mask_kind == "shared" else hq
        mask = torch.rand(b, heads, tq, tk, generator=g) < 0.7
        if mask_kind == "masked-rows":  # rows fully masked in one head only, or in every head
            mask[0, 1, 4] = False
            mask[0, :, 9] = False
            mask[1, 2, 20] = False
        if pad is not None:  # key padding and a 4-D mask together: fold padding into the mask
            mask &= api.pop("mask")[:, None, None, :]
            del ref["key_valid"]  # positions are then 0..Tk-1 for both
        api["mask"] = ref["mask"] = mask
    if with_bias:
        bias = torch.randn(b, hq, tq, tk, generator=g, dtype=torch.float64).to(dtype) * 1.5
        blocked = torch.rand(b, hq, tq, tk, generator=g) < 0.2  # blocked by a very negative bias
        blocked[..., 0] = False
        api["mask"] = bias.masked_fill(blocked, torch.finfo(dtype).min)
        ref["bias"], ref["mask"] = bias.masked_fill(blocked, 0.0), ~blocked
    if with_positions:  # explicit positions, not starting at 0, with gaps
        k_pos = torch.arange(tk) * 2 + 5
        api["k_pos"] = k_pos
        api["q_pos"] = k_pos[tk - tq :]
        ref["k_pos"], ref["q_pos"] = k_pos.expand(b, tk), k_pos[tk - tq :].expand(b, tq)
    if sink_offset is not None:
        sinks = torch.randn(hq, generator=g, dtype=torch.float64) * 2 + sink_offset
        api["sinks"] = ref["sinks"] = sinks.to(dtype)
    return q, k, api, ref


def assert_matches(got: kernels.AttentionStats, want: Reference, tol: float) -> None:
    assert got.rows.keys() == want.rows.keys(), (got.rows.keys(), want.rows.keys())
    cols = got.cols
    assert cols.keys() == want.cols.keys()
    for kind, a, b in (("row", got.rows, want.rows), ("col", cols, want.cols)):
        for name in b:
            torch.testing.assert_close(
                a[name].double(),
                b[name],
                atol=tol,
                rtol=tol,
                equal_nan=True,
                msg=lambda m, n=name, t=kind: f"{t} {n}: {m}",
            )
    torch.testing.assert_close(got.lse.double(), want.lse, atol=tol, rtol=tol, equal_nan=True)


def run_backend(backend: str, q: Tensor, k: Tensor, api: dict) -> kernels.AttentionStats:
    """``dense``, ``chunked`` or ``triton`` through attention_stats; ``chunked-N`` calls the
    chunked backend directly with blocks of N query rows (block_elements sized to give that)."""
    if backend.startswith("chunked-"):
        rows = int(backend.removeprefix("chunked-"))
        b, hq, tk = q.shape[0], q.shape[1], k.shape[2]
        return chunked_stats(build_request(q, k, **api), block_elements=rows * b * hq * tk)
    got = kernels.attention_stats(q, k, backend=backend, **api)
    assert got.backend == backend
    return got


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["dense", "chunked", "chunked-1", "chunked-5"])
def test_float64_is_exact(case, backend):
    q, k, api, ref = build(case, torch.float64)
    got = run_backend(backend, q, k, api)
    assert_matches(got, reference_stats(q, k, **ref), tol=F64_TOL)
    assert {t.dtype for t in (*got.rows.values(), *got.cols.values(), got.lse)} == {torch.float64}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["dense", "chunked", "chunked-3", "triton"])
def test_float32_matches(case, backend):
    if backend == "triton":
        if "triton" not in kernels.BACKENDS:
            pytest.skip("triton is not installed")
        if CASES[case].get("bias"):
            pytest.skip("triton refuses additive score biases")
        if "sinks" in CASES[case] and not kernels.BACKENDS["triton"].capabilities.sinks:
            pytest.skip("triton does not serve learned sinks yet")
    q, k, api, ref = build(case, torch.float32)
    got = run_backend(backend, q, k, api)
    assert_matches(got, reference_stats(q, k, **ref), tol=F32_TOL)
    assert {t.dtype for t in (*got.rows.values(), *got.cols.values(), got.lse)} == {torch.float32}


@pytest.mark.parametrize(
    ("dtype", "out"),
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
    ],
)
def test_metrics_keep_precision(dtype, out):
    """The dense metrics compute in the input's precision (at least float32), not always fp32."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 50, 50, generator=g, dtype=torch.float64) * 3
    attn = torch.softmax(scores.masked_fill(~torch.ones(50, 50).tril().bool(), -torch.inf), -1)
    attn = attn.to(dtype)
    dist = torch.arange(50.0)[:, None] - torch.arange(50.0)  # [Tq, Tk]
    a = attn.double()
    results = {
        "entropy": (metrics.entropy(attn), -(a * torch.log(a.clamp_min(1e-300))).sum(-1)),
        "mean_distance": (metrics.mean_distance(attn), (a * dist).sum(-1)),
        "waad": (metrics.waad(attn), (a * dist.clamp(0, 10)).sum(-1)),
        "received": (metrics.received(attn), a.sum(-2)),
        "fai": (metrics.fai(attn, (1, 5)), None),
        "sink_score": (metrics.sink_score(attn), None),
    }
    for name, (got, want) in results.items():
        assert got.dtype == out, name
        if want is not None and dtype == torch.float64:
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12, msg=name)


def test_reference_by_hand():
    """The reference itself on a case small enough to check by hand: two keys, equal scores."""
    q, k = torch.zeros(1, 1, 2, 4, dtype=torch.float64), torch.zeros(1, 1, 2, 4)
    r = reference_stats(q, k, fai_horizon=(1, 1), window=1)
    # row 0 sees key 0 only; row 1 sees keys 0 and 1 at 1/2 each
    assert r.rows["entropy"].flatten().tolist() == pytest.approx([0.0, 0.6931471805599453])
    assert r.rows["mean_distance"].flatten().tolist() == [0.0, 0.5]
    assert r.rows["sink_mass"].flatten().tolist() == [1.0, 0.5]
    assert r.cols["received"].flatten().tolist() == [1.5, 0.5]
    assert r.cols["sink_score"].flatten().tolist() == [0.75, 0.5]
    fai = r.cols["fai"].flatten()
    assert fai[0] == 0.5 and fai[1].isnan()  # key 1 has no row one step ahead
    assert r.lse.flatten().tolist() == pytest.approx([0.0, 0.6931471805599453])


@pytest.mark.parametrize("padded", [False, True], ids=["band", "key-padding"])
def test_scores_far_below_the_row_maximum(padded):
    """Trained models' score gaps put most weights below fp32's normal range: the chunked paths
    floor them (fast exp) and still match the float64 reference; masked keys stay exactly 0."""
    g = torch.Generator().manual_seed(7)
    q, k = (torch.randn(2, 2, 96, 16, generator=g) * 6 for _ in range(2))  # gaps of ~100s
    key_valid = None
    if padded:
        key_valid = torch.ones(2, 96, dtype=torch.bool)
        key_valid[1, :20] = False
    got = kernels.attention_stats(q, k, backend="chunked", mask=key_valid)
    want = reference_stats(q.double(), k.double(), key_valid=key_valid)
    assert_matches(got, want, tol=F32_TOL)
    if padded:
        assert (got.cols["received"][1, :, :20] == 0).all()
