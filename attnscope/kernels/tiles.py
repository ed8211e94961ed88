"""Attention tiles on demand: exact probabilities for a window of rows and keys, block-pooled.

For viewers: one head's attention over a window of a long run, from stored queries and keys,
without ever holding more than ``rows x T`` scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnscope.errors import ShapeError
from attnscope.kernels.request import build_request


def row_probabilities(
    q: Tensor,
    k: Tensor,
    head: int,
    positions: Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """Probabilities of the query rows at ``positions`` over all keys for one head.

    q ``[Hq, T, D]``, k ``[Hkv, Tk, D]`` (one sequence, positions 0..T-1); ``sinks`` ``[Hq]``:
    learned sink logits, in each row's normaliser (rows then sum to less than 1).
    ``[len(positions), Tk]``; rows that see no key are all zeros.
    """
    if not 0 <= head < q.shape[0]:
        raise ShapeError(f"head {head} outside 0..{q.shape[0] - 1}")
    group = q.shape[0] // k.shape[0]
    req = build_request(
        q[head, positions][None, None],  # [1, 1, r, D]
        k[head // group][None, None],  # [1, 1, Tk, D]
        causal=causal,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
        q_pos=positions,
        k_pos=torch.arange(k.shape[1]),
        sinks=None if sinks is None else torch.as_tensor(sinks)[head : head + 1],
        metrics=[],
    )
    everything = slice(None)
    s = req.scores(everything).masked_fill(~req.allowed(everything), float("-inf"))
    lse = req.with_sink(torch.logsumexp(s, -1))  # [1, 1, r]
    return torch.exp(s - lse[..., None])[0, 0].nan_to_num()


def attention_tile(
    q: Tensor,
    k: Tensor,
    head: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | Sequence[float] | None = None,
    pool: int = 1,
) -> Tensor:
    """Probabilities of query rows ``[r0, r1)`` over keys ``[c0, c1)`` for one head, normalised
    over all keys each row sees (and the learned sink, with ``sinks`` ``[Hq]``), then mean-pooled
    in ``pool x pool`` blocks.

    q ``[Hq, T, D]``, k ``[Hkv, T, D]`` (one sequence, positions 0..T-1). Returns
    ``[ceil((r1-r0)/pool), ceil((c1-c0)/pool)]`` float32.
    """
    t = q.shape[1]
    (r0, r1), (c0, c1) = rows, cols
    if not (0 <= r0 < r1 <= t and 0 <= c0 < c1 <= k.shape[1]):
        raise ShapeError(f"window rows {rows} x cols {cols} outside the run's {t} tokens")
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    probs = row_probabilities(
        q,
        k,
        head,
        torch.arange(r0, r1),
        scale=scale,
        causal=causal,
        sliding_window=sliding_window,
        softcap=softcap,
        sinks=sinks,
    )[:, c0:c1]  # [r, c]
    if pool == 1:
        return probs
    return torch.nn.functional.avg_pool2d(probs[None, None], pool, ceil_mode=True)[0, 0]
