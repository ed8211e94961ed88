"""Alignment heads from data: rank a speech model's decoder cross-attention heads by how well each
head's map alone times the words of synthesised speech whose word times are known.

Each clip is a sentence spoken one word at a time by espeak-ng, every word trimmed to its audible
part and set between ``gap`` seconds of silence, so the true start and end of every word is known.
The decoder is forced through the sentence; per head, words are timed by dynamic time warping over
that head's map (``timing.word_timings``) and scored by the boundary error, the median of
``|start - true start|`` and ``|end - true end|`` over the clip's words (seconds, lower is better).
A second, DTW-free score is the word mass: the mean share of a word's token rows' attention (over
the audio frames) that falls inside the word's true interval (higher is better).

```python
heads = alignment_heads(asc.load("whisper-tiny-en"), ["please open the window", ...])
heads.table()            # layer, head, boundary_error, word_mass, rank, published
heads.top(8), heads.overlap(8)   # derived top heads; how many of them the model publishes
```
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from math import ceil, floor
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from tqdm.auto import tqdm

from attnscope.errors import AttnscopeError
from attnscope.models.loaded import LoadedModel
from attnscope.speech.audio import SAMPLE_RATE, speak
from attnscope.speech.cross import capture_cross_attention
from attnscope.speech.inputs import prepare, transcript_ids
from attnscope.speech.timing import word_rows, word_timings

GAP = 0.2  # seconds of silence around each separately spoken word
LOUD = 0.02  # a sample is audible above this fraction of the word's peak


@dataclass(frozen=True)
class SpokenWords:
    """Speech with known word times: ``words`` ``[(word, start, end)]`` in seconds."""

    text: str
    audio: np.ndarray  # [n] mono 16 kHz
    words: list[tuple[str, float, float]]


def speak_words(text: str, directory: str | Path | None = None, gap: float = GAP) -> SpokenWords:
    """``text`` spoken one word at a time by espeak-ng: each word cut to its audible samples
    (above ``LOUD`` of its peak), with ``gap`` seconds of silence before, between and after."""
    silence = np.zeros(round(gap * SAMPLE_RATE), np.float32)
    pieces, words, t = [silence], [], gap
    with tempfile.TemporaryDirectory() as tmp:
        for word in text.split():
            audio = speak(word, directory or tmp)
            loud = np.flatnonzero(np.abs(audio) > LOUD * np.abs(audio).max())
            if not len(loud):
                raise AttnscopeError(f"espeak-ng produced no audible sample for {word!r}")
            audio = audio[loud[0] : loud[-1] + 1]
            words.append((word, t, t + len(audio) / SAMPLE_RATE))
            pieces += [audio, silence]
            t += len(audio) / SAMPLE_RATE + gap
    return SpokenWords(text, np.concatenate(pieces), words)


def boundary_errors(
    maps: Tensor, tokens: list[str], truth: Sequence[tuple[str, float, float]], frame_seconds: float
) -> Tensor:
    """Median boundary error (seconds) of the words timed by each head's map alone.

    maps ``[L, H, T, F]`` (row T-1: end of text) -> ``[L, H]``."""
    out = torch.empty(maps.shape[:2], dtype=torch.float64)
    for layer in range(maps.shape[0]):
        for head in range(maps.shape[1]):
            timed = word_timings(maps[layer, head][None], tokens, frame_seconds, end_row=True)
            errors = [abs(w.start - s) for w, (_, s, _) in zip(timed, truth, strict=True)]
            errors += [abs(w.end - e) for w, (_, _, e) in zip(timed, truth, strict=True)]
            out[layer, head] = float(np.median(errors))
    return out


def word_mass(
    maps: Tensor, tokens: list[str], truth: Sequence[tuple[str, float, float]], frame_seconds: float
) -> Tensor:
    """Mean over words of the share of the word's token rows' attention (renormalised over the
    ``F`` audio frames) inside the word's true frames. maps ``[L, H, T, F]`` -> ``[L, H]``."""
    share = maps / maps.sum(-1, keepdim=True)  # [L, H, T, F]
    per_word = []
    for (_, rows), (_, start, end) in zip(word_rows(tokens, end_row=True), truth, strict=True):
        frames = slice(floor(start / frame_seconds), ceil(end / frame_seconds))
        per_word.append(share[:, :, rows, frames].sum(-1).mean(-1))  # [L, H]
    return torch.stack(per_word).mean(0).double()


@dataclass
class AlignmentHeads:
    """Per-head timing scores on clips with known word times, and the model's published heads."""

    model: str
    layers: list[int]
    errors: Tensor  # [C, L, H] median boundary error per clip, seconds
    mass: Tensor  # [C, L, H] word mass per clip
    published: list[tuple[int, int]] | None  # the generation config's alignment_heads
    sentences: list[str]
    audio_seconds: list[float]
    seconds: float

    @property
    def score(self) -> Tensor:
        """Mean boundary error over the clips ``[L, H]`` (lower is better)."""
        return self.errors.mean(0)

    def top(self, n: int = 8) -> list[tuple[int, int]]:
        """The ``n`` heads with the lowest mean boundary error, best first (ties: more mass)."""
        score, mass = self.score, self.mass.mean(0)
        heads = [(li, h) for li in range(score.shape[0]) for h in range(score.shape[1])]
        ranked = sorted(heads, key=lambda x: (float(score[x]), -float(mass[x])))
        return [(self.layers[li], h) for li, h in ranked[:n]]

    def overlap(self, n: int | None = None) -> int | None:
        """How many of the top ``n`` (default: as many as published) heads are published ones."""
        if not self.published:
            return None
        return len(set(self.top(n or len(self.published))) & set(self.published))

    def table(self) -> pa.Table:
        """One row per head: layer, head, boundary_error (s, clip mean), word_mass (clip mean),
        rank (1 = best boundary error), published (in the model's alignment heads)."""
        n_heads = self.errors.shape[-1]
        order = {head: i + 1 for i, head in enumerate(self.top(len(self.layers) * n_heads))}
        published = set(self.published or ())
        heads = [(layer, h) for layer in self.layers for h in range(n_heads)]
        return pa.table(
            {
                "layer": [layer for layer, _ in heads],
                "head": [h for _, h in heads],
                "boundary_error": self.score.flatten().tolist(),
                "word_mass": self.mass.mean(0).flatten().tolist(),
                "rank": [order[x] for x in heads],
                "published": [x in published for x in heads],
            }
        )

    def published_vs_all(self) -> tuple[float, float]:
        """Median boundary error of the published heads and of all heads (seconds)."""
        if not self.published:
            raise AttnscopeError(f"{self.model} publishes no alignment heads")
        index = [(self.layers.index(layer), h) for layer, h in self.published]
        chosen = torch.stack([self.score[i] for i in index])
        return float(chosen.median()), float(self.score.median())


def alignment_heads(
    lm: LoadedModel,
    sentences: Sequence[str],
    *,
    gap: float = GAP,
    directory: str | Path | None = None,
    progress: bool = True,
) -> AlignmentHeads:
    """Score every decoder cross-attention head of ``lm`` as an alignment head on ``sentences``
    (lower case, plain words) spoken word by word (``speak_words``); see the module docstring."""
    start = time.perf_counter()
    if not sentences:
        raise AttnscopeError("alignment_heads needs at least one sentence")
    errors, masses, durations = [], [], []
    layers: list[int] = []
    for sentence in tqdm(sentences, desc="alignment clips", unit="clip", disable=not progress):
        spoken = speak_words(sentence, directory, gap)
        speech = prepare(lm, spoken.audio)
        cross = capture_cross_attention(lm, speech, transcript_ids(lm, sentence))
        timed = [w for w, _ in word_rows(cross.tokens, end_row=True)]
        if timed != [w for w, _, _ in spoken.words]:
            raise AttnscopeError(
                f"the tokens of {sentence!r} spell the words {timed}, not the spoken ones: "
                "use lower-case sentences of plain words without punctuation"
            )
        errors.append(boundary_errors(cross.maps, cross.tokens, spoken.words, speech.frame_seconds))
        masses.append(word_mass(cross.maps, cross.tokens, spoken.words, speech.frame_seconds))
        durations.append(speech.seconds)
        layers = cross.layers
    heads = getattr(lm.model.generation_config, "alignment_heads", None)
    return AlignmentHeads(
        model=lm.name,
        layers=layers,
        errors=torch.stack(errors),
        mass=torch.stack(masses),
        published=[(int(layer), int(h)) for layer, h in heads] if heads else None,
        sentences=list(sentences),
        audio_seconds=durations,
        seconds=time.perf_counter() - start,
    )
