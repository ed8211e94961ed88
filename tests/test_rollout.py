"""Attention rollout against explicit matrix products written from the definition (Abnar &
Zuidema 2020), on random attentions and on eager attentions of a tiny causal model."""

import pytest
import torch
from reference import eager_attentions

import attnscope as asc
from attnscope.errors import AttnscopeError
from attnscope.metrics.rollout import rollout, rollout_rows
from attnscope.vision.rollout import trace_rollout


def explicit_rollout(attn: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """``attn`` [L, H, T, T] -> [T, T]: one explicit product per layer, loops over entries."""
    n_layers, _, t, _ = attn.shape
    out = torch.eye(t, dtype=torch.float64)
    for layer in range(n_layers):
        mean = attn[layer].double().mean(0)
        r = torch.empty(t, t, dtype=torch.float64)
        for i in range(t):
            row = [residual * (i == j) + (1 - residual) * float(mean[i, j]) for j in range(t)]
            total = sum(row)
            r[i] = torch.tensor([v / total for v in row], dtype=torch.float64)
        out = r @ out  # the upper layer mixes what the lower layers produced
    return out


def random_attention(n_layers=3, n_heads=2, t=7, causal=False, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_layers, n_heads, t, t, generator=g) * 2
    if causal:
        logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1)


@pytest.mark.parametrize("causal", [False, True])
def test_rollout_equals_explicit_products(causal):
    attn = random_attention(causal=causal)
    expected = explicit_rollout(attn)
    got = rollout(attn)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got.sum(-1), torch.ones(7, dtype=torch.float64))
    torch.testing.assert_close(rollout(attn, rows=[0, -1]), expected[[0, -1]])
    torch.testing.assert_close(rollout(attn.mean(1)), expected)  # heads averaged by the caller
    torch.testing.assert_close(rollout(attn, residual=0.0), explicit_rollout(attn, 0.0))
    if causal:  # no position takes from a later one
        assert torch.all(got.triu(1) == 0)


def test_rollout_rows_asks_top_layer_first():
    attn = random_attention(n_layers=4)
    asked = []

    def attention_of(layer):
        asked.append(layer)
        return attn[layer]

    got = rollout_rows(attention_of, [1, 2, 3], rows=[2])
    assert asked == [3, 2, 1]
    torch.testing.assert_close(got, explicit_rollout(attn[1:])[[2]])


def test_rollout_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        rollout(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match="residual"):
        rollout(random_attention(), residual=1.5)
    with pytest.raises(ValueError, match="at least one layer"):
        rollout_rows(lambda i: None, [])


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_trace_rollout_equals_eager_products(name, cache_dir):
    """Rollout rebuilt from a capture's kept q/k equals products of eager attentions (causal;
    tiny-llama has grouped-query attention)."""
    lm = asc.load(name)
    ids = torch.randint(5, lm.model.config.vocab_size, (1, 24))
    with torch.no_grad(), asc.capture(lm.model, keep_qk=True) as cap:
        lm.model(input_ids=ids)
    trace = cap.trace
    attn = torch.stack(eager_attentions(lm.model, input_ids=ids))[:, 0]  # [L, H, T, T]
    expected = explicit_rollout(attn)
    torch.testing.assert_close(trace_rollout(trace), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        trace_rollout(trace, rows=[-1], layers=(1, len(trace.layers))),
        explicit_rollout(attn[1:])[[-1]],
        atol=1e-5,
        rtol=1e-4,
    )
    with pytest.raises(AttnscopeError, match="needs all of them captured"):
        trace_rollout(trace, layers=(0, len(trace.layers) + 1))
