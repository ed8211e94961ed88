"""Preplan / anchor detection and credit definitions (METRICS.md) on hand-built WAAD / FAI
sequences, and from a real trace."""

import pytest
import torch

import attnscope as asc
from attnscope.errors import AttnscopeError
from attnscope.rhythm import RhythmConfig, rhythm, sample_layers, token_sets
from attnscope.rl import CreditConfig, gammas, shape_advantages

# 10 response tokens. WAAD jumps between t=2->3 (delta 4) and t=6->7 (delta 5).
WAAD = torch.tensor([1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 0.5, 5.5, 5.5, 5.5])
# deltas: [0, 0, 4, 0, 0, 4.5, 5, 0, 0, 0(last)]
FAI = torch.tensor([0.1, 0.2, 0.05, 0.9, 0.3, 0.1, 0.0, 0.8, 0.6, float("nan")])
ENT = torch.arange(10.0)


def test_token_sets_by_hand():
    r = token_sets(WAAD, FAI, ENT, RhythmConfig())
    assert r.delta.tolist() == pytest.approx([0, 0, 4, 0, 0, 4.5, 5, 0, 0, 0])
    # top 40% (4 tokens) by delta: 6 (5), 5 (4.5), 2 (4), then the first zero (t=0, stable order)
    assert torch.nonzero(r.preplan).flatten().tolist() == [0, 2, 5, 6]
    # top 4 by FAI (NaN never chosen): 3 (0.9), 7 (0.8), 8 (0.6), 4 (0.3)
    assert torch.nonzero(r.anchor).flatten().tolist() == [3, 4, 7, 8]
    # tau_waad = median WAAD = 5.0, tau_delta = median delta = 0.
    # anchors with WAAD <= 5 and some delta >= 0 in [t-3, t-1]: 3 (5.0), 4 (5.0); 7, 8 have 5.5
    assert torch.nonzero(r.dominated).flatten().tolist() == [3, 4]
    # intro(3) = argmax delta over t=0..2 -> 2; intro(4) = argmax over t=1..3 -> 2
    assert torch.nonzero(r.intro).flatten().tolist() == [2]


def test_gammas_per_strategy():
    cfg = CreditConfig(gamma_amp=1.5, alpha=0.5)
    r = token_sets(WAAD, FAI, ENT, cfg)
    assert gammas(r, "local", cfg).tolist() == [1.5, 1, 1.5, 1, 1, 1.5, 1.5, 1, 1, 1]
    assert gammas(r, "global", cfg).tolist() == [1, 1, 1, 1.5, 1.5, 1, 1, 1.5, 1.5, 1]
    # coupled: anchors 7, 8 keep 1.5; dominated 3, 4 get 1 + 0.5 * 0.5; intro 2 gets 1 + 0.5 * 0.5
    assert gammas(r, "coupled", cfg).tolist() == [1, 1, 1.25, 1.25, 1.25, 1, 1, 1.5, 1.5, 1]
    random = gammas(r, "random", cfg)
    assert int((random > 1).sum()) == int(r.anchor.sum())
    assert torch.nonzero(gammas(r, "entropy", cfg) > 1).flatten().tolist() == [6, 7, 8, 9]
    with pytest.raises(AttnscopeError, match="unknown credit strategy"):
        gammas(r, "bogus", cfg)


def test_thresholds_change_dominance():
    r = token_sets(WAAD, FAI, ENT, RhythmConfig(tau_delta=4.5))
    # only anchors with a delta >= 4.5 within 3 tokens before them: 7 (delta_6 = 5), but its
    # WAAD 5.5 > median 5.0; 3 and 4 see at most 4 -> nothing dominated
    assert not r.dominated.any() and not r.intro.any()
    r = token_sets(WAAD, FAI, ENT, RhythmConfig(tau_waad=6.0, tau_delta=4.5))
    assert torch.nonzero(r.dominated).flatten().tolist() == [7, 8]
    assert torch.nonzero(r.intro).flatten().tolist() == [6]


def test_shape_advantages_signs_and_detach():
    adv = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    gamma = torch.tensor([1.5, 1.5, 1.0])
    both = shape_advantages(adv, gamma)
    assert both.tolist() == [1.5, -3.0, 3.0] and not both.requires_grad
    assert shape_advantages(adv, gamma, "positive").tolist() == [1.5, -2.0, 3.0]
    assert torch.equal(shape_advantages(adv, torch.ones(3)), adv.detach())


def test_sample_layers_middle_third():
    assert sample_layers(18, 5) == [6, 7, 8, 10, 11]
    assert sample_layers(3, 5) == [1]
    assert sample_layers(12, 2) == [4, 7]


def test_rhythm_from_a_trace(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path))
    lm = asc.load("tiny-llama")
    trace = asc.analyze(lm, "one two three", generate=16, fai_rows="response", progress=False)
    r = rhythm(trace, RhythmConfig(n_layers=5))
    credit = rhythm(trace, CreditConfig(n_layers=5))  # the credit config carries the detection's
    assert torch.equal(credit.preplan, r.preplan) and torch.equal(credit.anchor, r.anchor)
    n = trace.spans["response"][1] - trace.spans["response"][0]
    assert r.waad.shape == r.fai.shape == (n,)
    assert r.layers == sample_layers(len(trace.layers), 5)
    assert int(r.preplan.sum()) == round(0.4 * n)
    with pytest.raises(AttnscopeError, match="response"):
        rhythm(asc.analyze(lm, "one two three", progress=False))
