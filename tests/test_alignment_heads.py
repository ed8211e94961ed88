"""Alignment heads from data: per-head word-timing scores on speech with known word times, against
a reference from eager cross-attentions of Whisper tiny.en, and the published heads."""

from __future__ import annotations

import shutil
from math import ceil, floor

import numpy as np
import pytest
import torch

from attnscope.errors import AttnscopeError
from attnscope.findings.speech import alignment_heads_row, alignment_heads_verdict
from attnscope.models.loaded import LoadedModel
from attnscope.models.loader import load
from attnscope.speech import SAMPLE_RATE, prepare, word_timings
from attnscope.speech.heads import LOUD, alignment_heads, boundary_errors, speak_words, word_mass
from attnscope.speech.inputs import decoder_prefix, transcript_ids

SENTENCE = "the train to the coast leaves from platform seven at noon"
FRAME = 0.02


def _synthetic() -> tuple[torch.Tensor, list[str], list[tuple[str, float, float]]]:
    """Two words of 5 frames each in 20 frames; head 0 looks at each word's frames, head 1 is
    uniform. maps [1, 2, 3, 20] (rows: ' ab', ' cd', end of text)."""
    truth = [("ab", 0.1, 0.2), ("cd", 0.24, 0.34)]
    maps = torch.full((1, 2, 3, 20), 1 / 20)
    maps[0, 0] = 1e-6
    maps[0, 0, 0, 5:10] = 1.0
    maps[0, 0, 1, 12:17] = 1.0
    maps[0, 0, 2, 17:] = 1.0
    return maps, [" ab", " cd", "<|endoftext|>"], truth


def test_word_mass_is_the_share_inside_each_word() -> None:
    maps, tokens, truth = _synthetic()
    mass = word_mass(maps, tokens, truth, FRAME)
    assert mass.shape == (1, 2)
    assert mass[0, 0] == pytest.approx(1.0, abs=1e-4)  # all of each row inside its word
    assert mass[0, 1] == pytest.approx(5 / 20)  # uniform: the word's 5 of 20 frames


def test_a_head_on_the_words_has_a_smaller_boundary_error() -> None:
    maps, tokens, truth = _synthetic()
    errors = boundary_errors(maps, tokens, truth, FRAME)
    assert float(errors[0, 0]) <= 0.04  # within two frames of every true boundary
    assert float(errors[0, 1]) > float(errors[0, 0])


def test_tokens_that_spell_other_words_are_refused() -> None:
    maps, tokens, truth = _synthetic()
    with pytest.raises(ValueError):  # zip(strict=True): one word timed, two true ones
        word_mass(maps, tokens[1:], truth, FRAME)


@pytest.fixture(scope="module")
def whisper() -> LoadedModel:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make system-deps)")
    return load("whisper-tiny-en")


@pytest.mark.slow
def test_spoken_words_sit_at_their_known_times() -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make system-deps)")
    spoken = speak_words("open the window", gap=0.2)
    assert [w for w, _, _ in spoken.words] == ["open", "the", "window"]
    for _, start, end in spoken.words:  # each word starts and ends on an audible sample
        word = np.abs(spoken.audio[round(start * SAMPLE_RATE) : round(end * SAMPLE_RATE)])
        assert word[0] > LOUD * word.max() and word[-1] > LOUD * word.max()
    bounds = (
        [0.0] + [t for _, s, e in spoken.words for t in (s, e)] + [len(spoken.audio) / SAMPLE_RATE]
    )
    for start, end in zip(bounds[::2], bounds[1::2], strict=True):  # silence around the words
        assert end - start == pytest.approx(0.2, abs=1 / SAMPLE_RATE)
        assert not spoken.audio[round(start * SAMPLE_RATE) : round(end * SAMPLE_RATE)].any()


@pytest.mark.slow
def test_per_head_scores_equal_the_eager_reference(whisper: LoadedModel) -> None:
    heads = alignment_heads(whisper, [SENTENCE], progress=False)
    assert heads.errors.shape == heads.mass.shape == (1, 4, 6)
    # reference: eager cross-attentions of the same clip, each head timed on its own
    spoken = speak_words(SENTENCE)
    speech = prepare(whisper, spoken.audio)
    ids = transcript_ids(whisper, SENTENCE)
    assert len(ids) == len(SENTENCE.split())  # one token per word (the word mass below)
    prefix = decoder_prefix(whisper)
    whisper.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = whisper.model(
                speech.features,
                decoder_input_ids=torch.tensor([prefix + ids]),
                output_attentions=True,
            )
    finally:
        whisper.model.set_attn_implementation("sdpa")
    rows = slice(len(prefix) - 1, None)  # the row that predicts each token, then end of text
    eager = torch.stack(out.cross_attentions)[:, 0, :, rows, : speech.n_frames]  # [L, H, T+1, F]
    tokens = [whisper.tokenizer.decode([t]) for t in ids] + ["<|endoftext|>"]
    truth = spoken.words
    for layer in range(4):
        for head in range(6):
            timed = word_timings(eager[layer, head][None], tokens, FRAME, end_row=True)
            assert [w.word for w in timed] == SENTENCE.split()
            errors = [abs(w.start - s) for w, (_, s, _) in zip(timed, truth, strict=True)]
            errors += [abs(w.end - e) for w, (_, _, e) in zip(timed, truth, strict=True)]
            # captured maps equal eager ones to 1e-4 (scores measured identical); allow one frame
            assert float(heads.errors[0, layer, head]) == pytest.approx(
                np.median(errors), abs=0.021
            )
            a = eager[layer, head] / eager[layer, head].sum(-1, keepdim=True)
            share = [
                a[i, floor(s / FRAME) : ceil(e / FRAME)].sum()
                for i, (_, s, e) in enumerate(truth)  # one token per word in this sentence
            ]
            assert float(heads.mass[0, layer, head]) == pytest.approx(
                float(np.mean(share)), abs=1e-4
            )
    # 8 clips measured: the top 8 hold 6-7 published heads per clip, 7/8 over all 8 clips
    assert heads.overlap(8) >= 5
    published, every = heads.published_vs_all()
    assert published < every
    assert alignment_heads_verdict(heads).startswith("agrees")
    row = alignment_heads_row(heads)
    assert "(3,4)" in row.published and f"overlap {heads.overlap()}/8" in row.measured
    table = heads.table()
    assert sorted(table["rank"].to_pylist()) == list(range(1, 25))
    assert sum(table["published"].to_pylist()) == 8
    with pytest.raises(AttnscopeError, match="spell the words"):
        alignment_heads(whisper, ["Hello, world!"], progress=False)
