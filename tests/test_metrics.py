"""Dense reference metrics: hand-computed values and properties on random stochastic matrices."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnscope import metrics


def causal_attention(heads: int, t: int, seed: int, sharp: float = 1.0) -> torch.Tensor:
    """Random causal attention probabilities ``[heads, t, t]`` (masked keys exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(heads, t, t, generator=g) * sharp
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)


shapes = st.tuples(
    st.integers(1, 4), st.integers(1, 40), st.integers(0, 10_000), st.floats(0.1, 8.0)
)


def test_hand_computed_row():
    # query at position 2 attends 0.5 / 0.25 / 0.25 to positions 0 / 1 / 2
    a = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.5, 0.25, 0.25]])
    assert metrics.entropy(a)[2].item() == pytest.approx(
        -(0.5 * math.log(0.5) + 0.5 * math.log(0.25))
    )
    assert metrics.mean_distance(a)[2].item() == pytest.approx(0.5 * 2 + 0.25 * 1)
    assert metrics.waad(a, window=1)[2].item() == pytest.approx(0.5 * 1 + 0.25 * 1)
    assert metrics.sink_mass(a)[2].item() == pytest.approx(0.5)
    assert metrics.span_mass(a, 1, 3)[2].item() == pytest.approx(0.5)
    # FAI with horizon (1, 2): key 0 is seen by rows 1 and 2 -> (0.5 + 0.5) / 2
    assert metrics.fai(a, horizon=(1, 2))[0].item() == pytest.approx(0.5)
    assert math.isnan(metrics.fai(a, horizon=(1, 2))[2].item())  # no row 1..2 ahead of key 2
    # sink score: key 0 seen by all 3 rows: (1 + 0.5 + 0.5) / 3; key 2 by row 2 only
    assert metrics.sink_score(a)[0].item() == pytest.approx(2 / 3)
    assert metrics.sink_score(a)[2].item() == pytest.approx(0.25)
    assert metrics.received(a).tolist() == pytest.approx([2.0, 0.75, 0.25])


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 12))
def test_waad_bounds_and_clipping(shape, window):
    h, t, seed, sharp = shape
    a = causal_attention(h, t, seed, sharp)
    w = metrics.waad(a, window=window)
    assert (w >= -1e-6).all() and (w <= window + 1e-5).all()
    # a window wider than the sequence makes WAAD the mean distance
    assert torch.allclose(metrics.waad(a, window=t + 1), metrics.mean_distance(a), atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_entropy_bounded_by_visible_keys(shape):
    h, t, seed, sharp = shape
    a = causal_attention(h, t, seed, sharp)
    ent = metrics.entropy(a)
    visible = torch.arange(1, t + 1, dtype=torch.float32)
    assert (ent >= -1e-6).all()
    assert (ent <= torch.log(visible) + 1e-5).all()


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_masked_keys_get_nothing(shape):
    h, t, seed, sharp = shape
    a = causal_attention(h, t, seed, sharp)
    # the last key is visible only to the last row, so it receives exactly that row's mass
    assert torch.allclose(metrics.received(a)[..., -1], a[..., -1, -1])
    assert torch.allclose(metrics.sink_score(a)[..., -1], a[..., -1, -1])


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_linear_metrics_commute_with_head_average(shape):
    h, t, seed, sharp = shape
    a = causal_attention(h, t, seed, sharp)
    avg = a.mean(0)
    for fn in (
        metrics.mean_distance,
        metrics.waad,
        metrics.sink_mass,
        metrics.received,
        metrics.sink_score,
    ):
        assert torch.allclose(fn(avg), fn(a).mean(0), atol=1e-5)
    fa, fb = metrics.fai(avg, horizon=(1, 5)), metrics.fai(a, horizon=(1, 5)).mean(0)
    assert torch.equal(fa.isnan(), fb.isnan())
    assert torch.allclose(fa.nan_to_num(), fb.nan_to_num(), atol=1e-6)


def test_fully_masked_row_is_nan():
    a = causal_attention(1, 4, 0)[0]
    a[1] = float("nan")
    for fn in (metrics.entropy, metrics.mean_distance, metrics.waad, metrics.sink_mass):
        out = fn(a)
        assert out[1].isnan() and not out[[0, 2, 3]].isnan().any()
    assert not metrics.received(a).isnan().any()


def test_fai_rows_restrict_the_analysed_rows():
    a = causal_attention(1, 30, 3)[0]
    full = metrics.fai(a, horizon=(1, 100))
    late = metrics.fai(a, horizon=(1, 100), rows=(20, 30))
    manual = a[20:30, 5].mean()
    assert late[5].item() == pytest.approx(manual.item(), abs=1e-6)
    assert full[5].item() == pytest.approx(a[6:, 5].mean().item(), abs=1e-6)


def test_head_span_and_groups():
    span = torch.tensor([[1.0, 5.0, 3.0], [9.0, 2.0, 7.0]])
    groups = metrics.head_groups(span, fraction=1 / 3)
    assert groups["local"].tolist() == [[True, False, False], [False, True, False]]
    assert groups["global"].tolist() == [[False, False, False], [True, False, True]]
    a = causal_attention(2, 10, 1)
    assert torch.allclose(metrics.head_span(a), metrics.mean_distance(a).mean(-1))


def test_bad_parameters_raise():
    a = causal_attention(1, 4, 0)
    with pytest.raises(ValueError, match="window"):
        metrics.waad(a, window=0)
    with pytest.raises(ValueError, match="horizon"):
        metrics.fai(a, horizon=(5, 2))
