"""Word timings from cross-attention: dynamic time warping of tokens onto encoder frames over the
maps of the best-aligned heads (the method of openai-whisper's ``timing.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import median_filter
from torch import Tensor

MEDIAN_WIDTH = 7  # frames (140 ms) of median filtering along time


@dataclass(frozen=True)
class WordTiming:
    word: str
    start: float  # seconds
    end: float


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotonic path of least total cost from ``(0, 0)`` to ``(T-1, F-1)`` through ``[T, F]``;
    steps go one row down, one column right, or both. Returns row and column indices ``[K]``."""
    t, f = cost.shape
    total = np.full((t + 1, f + 1), np.inf)
    total[0, 0] = 0.0
    step = np.zeros((t + 1, f + 1), dtype=np.int8)  # 0 diagonal, 1 down (next row), 2 right
    for j in range(1, f + 1):
        for i in range(1, t + 1):
            moves = (total[i - 1, j - 1], total[i - 1, j], total[i, j - 1])
            best = int(np.argmin(moves))
            total[i, j] = cost[i - 1, j - 1] + moves[best]
            step[i, j] = best
    i, j, path = t, f, []
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        move = step[i, j]
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    rows, cols = np.array(path[::-1]).T
    return rows, cols


def alignment_matrix(maps: Tensor) -> np.ndarray:
    """``[K, T, F]`` maps of the chosen heads -> ``[T, F]``: each head standardised over tokens
    per frame, median-filtered along frames, averaged over heads."""
    w = maps.double().numpy()
    w = (w - w.mean(-2, keepdims=True)) / (w.std(-2, keepdims=True) + 1e-12)
    w = median_filter(w, size=(1, 1, MEDIAN_WIDTH), mode="nearest")
    return w.mean(0)


def token_starts(matrix: np.ndarray, frame_seconds: float) -> np.ndarray:
    """When each token's row is entered by the DTW path through ``-matrix``, in seconds ``[T]``."""
    rows, cols = dtw(-matrix)
    first = np.searchsorted(rows, np.arange(matrix.shape[0]))  # rows are non-decreasing
    return cols[first] * frame_seconds


def word_rows(tokens: list[str], end_row: bool) -> list[tuple[str, list[int]]]:
    """The words spelled by ``tokens`` and the token rows of each (see ``word_timings``)."""
    words: list[tuple[str, list[int]]] = []
    n_text = len(tokens) - 1 if end_row else len(tokens)
    for i, piece in enumerate(tokens[:n_text]):
        if not any(c.isalnum() or c == "\ufffd" for c in piece):  # U+FFFD: part of a character
            continue  # punctuation: timed (it ends the word before it) but not a word
        if piece.startswith(" ") or not words:
            words.append((piece.strip(), [i]))
        else:
            words[-1] = (words[-1][0] + piece, [*words[-1][1], i])
    return words


def word_timings(
    maps: Tensor, tokens: list[str], frame_seconds: float, end_row: bool
) -> list[WordTiming]:
    """``(word, start, end)`` for the words spelled by ``tokens`` (Whisper's byte-level pieces as
    text: a leading space starts a word, pieces without letters or digits are punctuation; a
    character split over pieces shows as U+FFFD).

    ``maps`` ``[K, T, F]``: the chosen heads' cross-attention of each token. With ``end_row`` the
    last row is the end-of-text prediction, which is not a word. A word ends where the next token
    (punctuation or end of text included) starts; the last one at the end of the frames.
    """
    starts = token_starts(alignment_matrix(maps), frame_seconds)
    n_frames = maps.shape[-1]
    timings = []
    for word, rows in word_rows(tokens, end_row):
        last = rows[-1]
        end = starts[last + 1] if last + 1 < len(starts) else n_frames * frame_seconds
        timings.append(WordTiming(word, float(starts[rows[0]]), float(max(end, starts[last]))))
    return timings
