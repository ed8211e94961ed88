"""Long inputs: the chunked backend scores only each block's visible band, falls back exactly
where a mask disagrees with the band, long forwards show per-layer progress, ``--fused`` runs.
(Small sizes here; 8K-32K runs are in benchmarks/long_context.py.)"""

from __future__ import annotations

import pytest
import torch

import attnscope as asc
from attnscope.cli import main
from attnscope.kernels import attention_stats
from attnscope.kernels import chunked as chunked_module
from attnscope.probes.session import layer_progress


def assert_same(a, b, tol: float = 2e-5) -> None:
    for name in a.rows:
        torch.testing.assert_close(a.rows[name], b.rows[name], atol=tol, rtol=tol, equal_nan=True)
    for name in a.cols:
        torch.testing.assert_close(a.cols[name], b.cols[name], atol=tol, rtol=tol, equal_nan=True)


def test_sliding_window_scores_only_the_band(monkeypatch) -> None:
    """A 2048-token sliding layer (window 64) scores O(L x W) pairs, not O(L^2), and its
    statistics equal the dense backend's."""
    scored: list[int] = []
    original = chunked_module._BandInputs.scores

    def spy(self, rs, ks):
        s = original(self, rs, ks)
        scored.append(s.numel())
        return s

    monkeypatch.setattr(chunked_module._BandInputs, "scores", spy)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 2048, 16, generator=g)  # [B, Hq, T, D]
    k = torch.randn(1, 1, 2048, 16, generator=g)  # [B, Hkv, T, D]
    fast = attention_stats(q, k, sliding_window=64, backend="chunked")
    causal_pairs = 2 * 2048 * 2049 // 2  # what a causal layer scores (both heads)
    assert scored and sum(scored) < causal_pairs / 4, (sum(scored), causal_pairs)
    monkeypatch.setattr(chunked_module._BandInputs, "scores", original)
    assert_same(fast, attention_stats(q, k, sliding_window=64, backend="dense"))


def test_a_mask_that_cuts_inside_the_band_takes_the_general_path() -> None:
    """A mask that removes keys the positions allow (interventions) is honoured exactly."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 300, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g)
    causal = torch.ones(300, 300, dtype=torch.bool).tril()
    mask = (causal & (torch.rand(300, 300, generator=g) < 0.7)) | torch.eye(300, dtype=torch.bool)
    mask = mask[None, None]  # [1, 1, T, T]
    got = attention_stats(q, k, mask=mask, backend="chunked")
    assert_same(got, attention_stats(q, k, mask=mask, backend="dense"))
    # the causal mask itself (what SDPA receives) is served by the band path, also exactly
    plain = attention_stats(q, k, mask=causal[None, None], backend="chunked")
    assert_same(plain, attention_stats(q, k, backend="dense"))


@pytest.mark.parametrize("window", [None, 30])
def test_rows_that_see_no_key_beside_rows_that_do(window) -> None:
    """Queries placed before every key (causal): the banded blocks that hold both kinds of row
    give NaN statistics and lse -inf to the first, as the dense backend does, and the rest
    match it (spans, sinks and column sums included)."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 100, 16, generator=g, dtype=torch.float64)  # [B, Hq, T, D]
    k = torch.randn(1, 2, 100, 16, generator=g, dtype=torch.float64)  # [B, Hkv, T, D]
    where = dict(q_pos=torch.arange(100)[None], k_pos=torch.arange(50, 150)[None])
    options = dict(sliding_window=window, spans={"early": (55, 60)}, **where)
    fast = attention_stats(q, k, backend="chunked", **options)
    slow = attention_stats(q, k, backend="dense", **options)
    assert_same(fast, slow, tol=1e-10)
    torch.testing.assert_close(fast.lse, slow.lse)
    assert fast.rows["entropy"][..., :50].isnan().all()
    assert fast.rows["entropy"][..., 50:].isfinite().all()


@pytest.fixture(scope="module")
def lm(cache_dir):
    return asc.load("tiny-llama")


def test_layer_progress_counts_every_attention_layer(lm, capsys) -> None:
    ids = torch.randint(5, 100, (1, 16))
    with torch.no_grad(), layer_progress(lm.model):
        lm.model(input_ids=ids)
    n = lm.model.config.num_hidden_layers
    err = capsys.readouterr().err
    assert "attention layers" in err and f"{n}/{n}" in err


def test_cli_fused_run(lm, tmp_path) -> None:
    out = tmp_path / "run"
    args = ["analyze", "--model", "tiny-llama", "--prompt", "one two three four", "--out"]
    assert main([*args, str(out), "--fused"]) == 0
    fused = asc.Trace.load(out)
    assert fused.meta["stats_config"]["exact_logits"] is False
    assert "fused forward" in fused.meta["backend_reason"]
    assert main([*args, str(tmp_path / "exact")]) == 0
    exact = asc.Trace.load(tmp_path / "exact")
    assert exact.meta["stats_config"]["exact_logits"] is True
    for name in exact.rows:
        torch.testing.assert_close(fused.rows[name], exact.rows[name], atol=1e-4, rtol=1e-4)
