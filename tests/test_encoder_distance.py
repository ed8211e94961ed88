"""Distance metrics of bidirectional (encoder) attention: |t - s|, symmetric, in every backend.

all-MiniLM-L6-v2 (BERT, packaged weights): statistics captured through each backend are compared
with the dense reference on the eager attentions, and with the independent float64 reference
(tests/independent.py) on the captured queries and keys.
"""

from __future__ import annotations

import pytest
import torch
from independent import reference_stats

import attnscope as asc
from attnscope import metrics
from attnscope.kernels import attention_stats

TEXT = "Attention in an encoder looks both ways: at the words before and after each token."
ROWS = ("entropy", "mean_distance", "waad", "sink_mass", "max_attention")


@pytest.fixture(scope="module")
def minilm():
    lm = asc.load("minilm-l6", attn_implementation="eager")
    ids = lm.tokenizer(TEXT, return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        out = lm.model(input_ids=ids, output_attentions=True)
    attentions = torch.stack(out.attentions)[:, 0]  # [6, 12, T, T]
    assert attentions.shape[:2] == (6, 12), "eager returned the wrong number of layers or heads"
    return lm, ids, attentions


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["chunked", "triton", "dense"])
def test_encoder_distances_match_the_reference(minilm, backend: str) -> None:
    lm, ids, attn = minilm
    with torch.no_grad(), asc.capture(lm.model, metrics=ROWS, backend=backend) as cap:
        lm.model(input_ids=ids)
    trace = cap.trace
    t = attn.shape[-1]
    dist = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).abs().float()  # [T, T] |t - s|
    expected = {
        "mean_distance": (attn * dist).sum(-1),  # written out from the definition
        "waad": (attn * dist.clamp(max=10)).sum(-1),
        "entropy": metrics.entropy(attn),
        "sink_mass": metrics.sink_mass(attn),
        "max_attention": metrics.max_attention(attn),
    }
    for name, value in expected.items():
        torch.testing.assert_close(trace.rows[name], value, atol=1e-4, rtol=1e-4, msg=name)
    md = trace.rows["mean_distance"]  # [L, H, T]
    assert bool((md >= 0).all()), "mean |t - s| is never negative"
    # [CLS] only looks ahead: the signed sum_s A (t - s) is exactly minus the distance there
    signed = (attn * (torch.arange(t)[:, None] - torch.arange(t)[None, :]).float()).sum(-1)
    torch.testing.assert_close(md[..., 0], -signed[..., 0], atol=1e-4, rtol=1e-4)
    assert float(md[..., 0].mean()) > 0.5, "[CLS] attends to later tokens on average"
    assert bool((trace.rows["waad"] <= 10 + 1e-5).all())
    torch.testing.assert_close(metrics.mean_distance(attn), expected["mean_distance"])


def test_bidirectional_distances_against_the_independent_reference() -> None:
    """Random q/k, non-causal, with key padding: every backend equals the float64 reference."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 40, 16, generator=g) * 2  # [B, Hq, T, D]
    k = torch.randn(2, 2, 40, 16, generator=g) * 2  # [B, Hkv, T, D]
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 30:] = False  # right padding of the second sequence
    ref = reference_stats(q, k, causal=False, key_valid=valid, window=6)
    for backend in ("chunked", "triton", "dense"):
        got = attention_stats(
            q, k, causal=False, mask=valid, window=6, metrics=ROWS, backend=backend
        )
        for name in ROWS:
            torch.testing.assert_close(
                got.rows[name].double(),
                ref.rows[name],
                atol=2e-5,
                rtol=2e-5,
                equal_nan=True,
                msg=lambda m, n=name, b=backend: f"{b} {n}: {m}",
            )
    assert bool((ref.rows["mean_distance"].nan_to_num() >= 0).all())
