"""The fused forward (``exact_logits=False``): output within fp tolerance of SDPA, statistics equal
to the reference, on random inputs and on Gemma-3-270M with a sliding window shorter than the
prompt."""

from __future__ import annotations

import pytest
import torch
from independent import reference_output, reference_stats
from reference import assert_trace_matches, eager_attentions

import attnscope as asc
from attnscope.errors import ShapeError
from attnscope.kernels import attention_stats
from attnscope.kernels.fused import fused_attention

CASES = {
    "causal-gqa": dict(),
    "sliding": dict(sliding_window=24),
    "softcap": dict(softcap=5.0),
    "noncausal": dict(causal=False),
    "padding": dict(padded=True),
    "sinks": dict(sinks=True),
}


def inputs(case: str):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 96, 16, generator=g) * 2  # [B, Hq, T, D]
    k = torch.randn(2, 2, 96, 16, generator=g) * 2  # [B, Hkv, T, D]
    v = torch.randn(2, 2, 96, 8, generator=g)  # [B, Hkv, T, Dv]
    opts = dict(CASES[case])
    valid = None
    if opts.pop("padded", False):
        valid = torch.ones(2, 96, dtype=torch.bool)
        valid[1, :20] = False  # left padding of the second sequence
        opts["mask"] = valid
    if opts.pop("sinks", False):
        opts["sinks"] = torch.randn(4, generator=g)
    return q, k, v, opts, valid


@pytest.mark.parametrize("case", CASES)
def test_fused_output_and_stats_match_the_references(case: str) -> None:
    q, k, v, opts, valid = inputs(case)
    out, stats = fused_attention(q, k, v, window=6, **opts)
    expected = reference_output(
        q,
        k,
        v,
        causal=opts.get("causal", True),
        sliding_window=opts.get("sliding_window"),
        softcap=opts.get("softcap"),
        key_valid=valid,
        sinks=opts.get("sinks"),
    )
    assert out.shape == (2, 4, 96, 8) and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    ref_opts = {key: val for key, val in opts.items() if key != "mask"}
    ref = reference_stats(q, k, window=6, key_valid=valid, **ref_opts)
    for name, value in {**ref.rows, **ref.cols}.items():
        got = stats.rows.get(name, stats.cols.get(name))
        torch.testing.assert_close(
            got.double(), value, atol=2e-5, rtol=2e-5, equal_nan=True, msg=lambda m, n=name: n + m
        )
    same = attention_stats(q, k, window=6, backend="chunked", **opts)  # the exact path's stats
    for name, value in same.rows.items():
        torch.testing.assert_close(stats.rows[name], value, atol=1e-6, rtol=1e-6, equal_nan=True)


def test_fused_refuses_a_value_that_does_not_match_the_keys() -> None:
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 1, 8, 4)
    with pytest.raises(ShapeError, match=r"v must be \[B, Hkv, Tk, Dv\]"):
        fused_attention(q, k, torch.randn(1, 1, 7, 4))


def test_exact_logits_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="exact_logits must be True or False"):
        asc.StatsConfig(exact_logits="no")


@pytest.fixture(scope="module")
def gemma_short_window():
    """Gemma-3-270M with its sliding layers' window cut to 48 tokens (config and modules), so a
    short prompt crosses the window edge in every sliding layer."""
    lm = asc.load("gemma3-270m")
    lm.model.config.sliding_window = 48
    for module in lm.model.modules():
        if getattr(module, "is_sliding", False):
            module.sliding_window = 48
    return lm


@pytest.mark.slow
def test_fused_gemma_logits_and_trace(gemma_short_window) -> None:
    lm = gemma_short_window
    text = "The keeper of the lighthouse wrote the weather into his notebook every evening. " * 4
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :120]  # [1, 120] > 48
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits
        with asc.capture(lm.model) as exact:
            same = lm.model(input_ids=ids).logits
        with asc.capture(lm.model, exact_logits=False) as fused:
            logits = lm.model(input_ids=ids).logits
    assert torch.equal(plain, same), "the default capture keeps SDPA's logits bit-identical"
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)
    assert "fused forward" in fused.trace.meta["backend_reason"]
    a, b = fused.trace, exact.trace
    for name in a.rows:
        torch.testing.assert_close(a.rows[name], b.rows[name], atol=1e-4, rtol=1e-4, equal_nan=True)
    attn = torch.stack(eager_attentions(lm.model, input_ids=ids))[:, 0]  # [L, H, T, T]
    assert_trace_matches(a, attn)


@pytest.mark.parametrize("case", ["causal-gqa", "sliding", "padding", "sinks"])
def test_triton_fused_output_in_the_interpreter(case: str) -> None:
    """The Triton row kernel with P @ V (the GPU path), run by the interpreter on the CPU."""
    q, k, v, opts, valid = inputs(case)
    out, stats = fused_attention(q, k, v, window=6, backend="triton", **opts)
    assert stats.backend == "triton"
    expected = reference_output(
        q,
        k,
        v,
        sliding_window=opts.get("sliding_window"),
        key_valid=valid,
        sinks=opts.get("sinks"),
    )
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    same = attention_stats(q, k, window=6, backend="chunked", **opts)
    for name, value in same.rows.items():
        torch.testing.assert_close(stats.rows[name], value, atol=2e-5, rtol=2e-5, equal_nan=True)
