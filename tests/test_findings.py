"""Reproductions of published findings (attnscope.findings): the definitions on constructed inputs
with known answers, the measurements on a tiny model against eager attention, and the Gemma sink
scores against the dense reference (slow)."""

from __future__ import annotations

import pytest
import torch
from reference import eager_attentions

from attnscope import metrics
from attnscope.errors import AttnscopeError
from attnscope.findings import (
    Row,
    alpha0,
    anchor_coupling,
    count_teeth,
    coupled,
    dominant_distance,
    entropy_at_peaks,
    first_token_sink_scores,
    layer_sink_ratio,
    markdown,
    measure_heads,
    measure_rhythm,
    measure_sinks,
    peaks,
    sink_inputs,
    sink_ratio,
    to_arrow,
    token_entropy,
)
from attnscope.findings.heads import head_probabilities
from attnscope.findings.rhythm import random_like
from attnscope.findings.texts import english_paragraphs, word_problems
from attnscope.models.loaded import LoadedModel
from attnscope.models.loader import load
from attnscope.probes.capture import capture
from attnscope.trace import Trace

NAN = float("nan")


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load("tiny-llama")


# -- peaks and baselines ---------------------------------------------------------------------
def test_peaks_are_local_maxima_above_the_80th_percentile() -> None:
    x = torch.ones(20)
    x[[1, 8, 9, 12, 15, 10]] = torch.tensor([3.0, 8.0, 8.0, 6.0, 1.5, 2.0])
    # 80th percentile of the 20 values (linear interpolation) = 2.2: the bump at 15 is a local
    # maximum below it; the plateau at 8-9 counts once, at its first point
    assert peaks(x).nonzero().flatten().tolist() == [1, 8, 12]
    assert peaks(x, quantile=0.0).nonzero().flatten().tolist() == [1, 8, 12, 15]


def test_nan_is_never_a_peak_and_counts_as_minus_infinity_next_to_one() -> None:
    x = torch.tensor([NAN, 4.0, NAN, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert peaks(x).nonzero().flatten().tolist() == [1]
    assert not peaks(torch.full((5,), NAN)).any()
    assert peaks(torch.tensor([5.0, 1.0, 1.0, 1.0, 1.0])).tolist() == [True] + [False] * 4
    with pytest.raises(AttnscopeError, match="one signal"):
        peaks(torch.zeros(2, 3))


def test_an_anchor_is_coupled_to_a_preplan_peak_at_most_k_tokens_before_it() -> None:
    n = 14
    anchor = torch.zeros(n, dtype=torch.bool)
    anchor[[3, 10]] = True
    preplan = torch.zeros(2, n, dtype=torch.bool)
    preplan[0, [0, 7]] = True  # 3 before the first anchor, 3 before the second
    preplan[1, [4, 11]] = True  # both one token after: never coupled
    got = coupled(anchor, preplan, k=3)
    assert got[0].nonzero().flatten().tolist() == [3, 10]
    assert not got[1].any()
    assert coupled(anchor, preplan[0], k=2).nonzero().flatten().tolist() == []
    same = anchor.clone()  # a preplan peak at the anchor itself counts
    assert coupled(anchor, same, k=0).nonzero().flatten().tolist() == [3, 10]


def test_random_positions_keep_the_count_and_are_uniform() -> None:
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[2, 5, 7]] = True
    draws = random_like(mask, 20_000, torch.Generator().manual_seed(0))
    assert draws.shape == (20_000, 10) and (draws.sum(-1) == 3).all()
    torch.testing.assert_close(draws.float().mean(0), torch.full((10,), 0.3), atol=0.015, rtol=0)


def test_shuffled_coupling_matches_its_expectation() -> None:
    """One WAAD peak placed uniformly among R = 20 positions lands in [t - 3, t] with probability
    4/20 for an anchor at t = 10 and 2/20 for one at t = 1: pooled expectation 0.15."""
    anchors, preplans = [], []
    for t in (10, 1):
        a = torch.zeros(20, dtype=torch.bool)
        a[t] = True
        p = torch.zeros(20, dtype=torch.bool)
        p[t - 1] = True  # the observed peak is coupled in both responses
        anchors.append(a)
        preplans.append(p)
    c = anchor_coupling(anchors, preplans, k=3, n_shuffles=20_000, seed=0)
    assert c.observed == 1.0
    assert c.baseline == pytest.approx(0.15, abs=0.01)
    assert c.p_value == pytest.approx(0.2 * 0.1, abs=0.005)  # both coupled by chance


def test_entropy_at_peaks_against_random_positions() -> None:
    entropy = [torch.arange(10.0), torch.ones(6)]
    peak = [torch.zeros(10, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)]
    peak[0][9] = True
    peak[1][[1, 4]] = True
    c = entropy_at_peaks(entropy, peak, n_shuffles=20_000, seed=1)
    assert c.observed == pytest.approx((9 + 1 + 1) / 3)
    assert c.baseline == pytest.approx((4.5 + 2 * 1) / 3, abs=0.03)  # one draw from 0..9, two 1s
    assert c.p_value < 0.15  # only a draw of 9 reaches the observation: 1/10
    with pytest.raises(AttnscopeError, match="no peaks"):
        entropy_at_peaks(entropy, [torch.zeros_like(p) for p in peak], 10)


# -- sawtooth ----------------------------------------------------------------------------------
def _pattern(targets: list[int], sink: float = 0.3) -> torch.Tensor:
    """Attention [T, T]: row t puts ``sink`` on the first token and the rest on ``targets[t]``."""
    t = len(targets)
    probs = torch.zeros(t, t)
    probs[:, 0] = sink
    probs[0, 0] = 1.0
    for row, key in enumerate(targets[1:], start=1):
        probs[row, key] += 1 - sink
    return probs


def test_a_chunked_head_draws_one_tooth_per_chunk_boundary() -> None:
    # chunks of 5 tokens starting at 1, 6, 11, ...: each row attends to its chunk's first token
    targets = [0] + [1 + 5 * ((t - 1) // 5) for t in range(1, 41)]
    d = dominant_distance(_pattern(targets))
    assert d.tolist() == [0, 1, 2, 3, 4] * 8
    assert count_teeth(d) == 7  # 8 chunks, 7 resets after a rise of 4
    assert count_teeth(d, min_rise=5) == 0


@pytest.mark.parametrize(
    "targets",
    [
        [0, 1, *range(1, 39)],  # previous token: d = 1
        list(range(40)),  # itself: d = 0
        [0] + [1] * 39,  # one far key held for ever: d rises, never resets
        [0] + [1] * 30 + [25] * 9,  # a far key, then a newer far key: the reset starts at d = 29
    ],
    ids=["previous-token", "self", "anchored", "far-jump"],
)
def test_heads_without_a_sawtooth_have_no_teeth(targets: list[int]) -> None:
    assert count_teeth(dominant_distance(_pattern(targets))) == 0


def test_far_teeth_count_only_when_the_width_limit_allows() -> None:
    d = dominant_distance(_pattern([0] + [1] * 30 + [25] * 9))
    assert count_teeth(d, max_width=100) == 1


def test_head_probabilities_rebuild_the_eager_attention(tiny: LoadedModel) -> None:
    ids = tiny.tokenizer(english_paragraphs()[0], return_tensors="pt").input_ids[:, :24]
    with capture(tiny.model, metrics=("mean_distance",), keep_qk=True) as cap:
        tiny.model(input_ids=ids)
    eager = eager_attentions(tiny.model, input_ids=ids)
    for layer in cap.trace.layers:
        for head in range(cap.trace.n_heads):
            torch.testing.assert_close(
                head_probabilities(cap.trace, layer, head), eager[layer][0, head], atol=1e-5, rtol=0
            )


def test_heads_measurement_on_a_tiny_model(tiny: LoadedModel) -> None:
    result = measure_heads(tiny, n_samples=2, max_tokens=40, progress=False)
    n_layers, n_heads = len(result.layers), 4
    assert result.span.shape == (2, n_layers, n_heads)
    assert result.rows == sum(n - 1 for n in result.n_tokens)
    assert result.groups["local"].sum() == result.groups["global"].sum() == round(0.3 * 8)
    assert "sawtooth in" in result.row().measured
    assert result.figure().data


# -- sinks -------------------------------------------------------------------------------------
def _trace(sink_score: torch.Tensor) -> Trace:
    n_layers, n_heads, n = sink_score.shape
    return Trace(
        tokens=[f"t{i}" for i in range(n)],
        token_ids=list(range(n)),
        spans={},
        layers=list(range(n_layers)),
        n_heads=n_heads,
        rows={},
        cols={"sink_score": sink_score},
    )


def test_sink_ratio_from_built_traces() -> None:
    first = torch.tensor([[0.9, 0.1], [0.31, 0.3]])  # [L, H]; 0.3 is not above eps = 0.3
    second = torch.tensor([[0.5, 0.5], [0.0, 0.2]])
    traces = [
        _trace(torch.cat([a[..., None], torch.full((2, 2, 3), 0.05)], -1)) for a in (first, second)
    ]
    alpha = alpha0(traces)
    torch.testing.assert_close(alpha, torch.stack([first, second]))
    assert sink_ratio(alpha) == pytest.approx(100 * 4 / 8)
    torch.testing.assert_close(layer_sink_ratio(alpha), torch.tensor([75.0, 25.0]))
    with pytest.raises(AttnscopeError, match="sink_score"):
        alpha0([Trace(["a"], [0], {}, [0], 1, {}, {})])


def test_sink_inputs_put_bos_first_and_refuse_short_texts(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    texts = list(english_paragraphs()[:2])
    with_bos = sink_inputs(tok, texts, 16)
    without = sink_inputs(tok, texts, 16, bos=False)
    assert with_bos.shape == without.shape == (2, 16)
    assert (with_bos[:, 0] == tok.bos_token_id).all()
    assert with_bos[:, 1:].tolist() == without[:, :15].tolist()
    with pytest.raises(AttnscopeError, match="fewer than T = 64"):
        sink_inputs(tok, ["too short"], 64)


def _check_sink_scores_against_eager(lm: LoadedModel, n_tokens: int) -> None:
    ids = sink_inputs(lm.tokenizer, english_paragraphs()[:2], n_tokens)  # [2, T]
    ours = first_token_sink_scores(lm, ids, batch_size=2, progress=False)  # [2, L, H]
    attn = torch.stack(eager_attentions(lm.model, input_ids=ids))  # [L, 2, H, T, T]
    reference = metrics.sink_score(attn.float())[..., 0].permute(1, 0, 2)  # [2, L, H]
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    assert sink_ratio(ours) == sink_ratio(reference)


def test_sink_scores_match_eager_attention_on_a_tiny_model(tiny: LoadedModel) -> None:
    _check_sink_scores_against_eager(tiny, 32)
    result = measure_sinks(tiny, n_samples=3, n_tokens=32, progress=False)
    assert result.alpha0.shape == result.alpha0_no_bos.shape == (3, 2, 4)
    assert result.row().finding.startswith("Attention sink")


@pytest.mark.slow
def test_gemma_sink_scores_match_eager_attention() -> None:
    gemma = load("gemma3-270m")
    _check_sink_scores_against_eager(gemma, 64)
    lengths = [len(gemma.tokenizer(p).input_ids) for p in english_paragraphs()]
    assert len(lengths) >= 30 and min(lengths) >= 64  # every paragraph fills T = 64


# -- rhythm ------------------------------------------------------------------------------------
@torch.no_grad()
def test_token_entropy_is_the_entropy_of_each_tokens_distribution(tiny: LoadedModel) -> None:
    ids = tiny.tokenizer("Question: how many apples are left?", return_tensors="pt").input_ids
    out = tiny.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    tokens, start = out[0].tolist(), ids.shape[1]
    entropy, greedy = token_entropy(tiny, tokens, start)
    logp = tiny.model(input_ids=out).logits[0].float().log_softmax(-1)  # [T, V]
    expected = -(logp.exp() * logp).sum(-1)[start - 1 :]
    torch.testing.assert_close(entropy, expected, atol=1e-5, rtol=1e-5)
    assert entropy.shape == (len(tokens) - start + 1,) and greedy.all()


def test_rhythm_measurement_on_a_tiny_model(tiny: LoadedModel) -> None:
    result = measure_rhythm(tiny, n_samples=2, generate=24, n_shuffles=50, progress=False)
    assert len(result.samples) + result.skipped == 2
    s = result.samples[0]
    assert s.waad.shape == s.fai.shape == s.entropy.shape == s.waad_peaks.shape
    assert result.greedy_agreement == 1.0
    assert result.entropy.draws.shape == (50,)
    assert "(a)" in result.verdict() and "(b)" in result.verdict()


def test_word_problems_are_seeded_and_varied() -> None:
    problems = word_problems(16)
    assert problems == word_problems(16) and problems != word_problems(16, seed=1)
    assert len({p.question for p in problems}) == 16
    assert all(p.answer >= 0 and p.prompt.startswith("Question: ") for p in problems)


# -- table -------------------------------------------------------------------------------------
def test_markdown_table_has_one_line_per_row_and_escapes_pipes() -> None:
    rows = [Row("sinks", "> 50%", "76%", "alpha | 0 > 0.3"), Row("b", "c", "d\nmore", "e")]
    lines = markdown(rows).splitlines()
    assert lines[0] == (
        "| finding | published figure | attnscope on the packaged model | how measured |"
    )
    assert lines[2] == "| sinks | > 50% | 76% | alpha \\| 0 > 0.3 |"
    assert lines[3] == "| b | c | d more | e |"
    assert to_arrow(rows).num_rows == 2
