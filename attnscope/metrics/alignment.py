"""Cross-attention vs saliency (METRICS.md): pooling to the encoder frame rate, Pearson on
standardised maps, per-token Spearman, top-k overlap, deletion curves, and the per-head table.

Maps are ``[..., T, F]``: T output tokens x F encoder frames (only frames that hold audio).
Attention maps broadcast against one saliency map ``[T, F]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from scipy.stats import rankdata
from torch import Tensor

Reduce = Literal["max", "mean"]
TABLE = pa.schema(
    [
        ("method", pa.string()),
        ("scope", pa.string()),  # head | layer (mean of its heads' maps) | all (mean of every map)
        ("layer", pa.int32()),
        ("head", pa.int32()),
        ("pearson", pa.float32()),
        ("spearman", pa.float32()),
        ("topk_overlap", pa.float32()),
    ]
)


@dataclass(frozen=True)
class Pooling:
    """How input-level relevance ``[T, n_freq, n_time]`` becomes ``[T, F]`` at the frame rate."""

    freq: Reduce = "max"
    time: Reduce = "max"
    factor: int = 2  # input time steps per encoder frame (Whisper: 2 mel frames, 20 ms)
    magnitude: bool = True  # pool |relevance|: sign says direction, not importance

    def as_dict(self) -> dict:
        return asdict(self)


def pool_saliency(values: Tensor, pooling: Pooling = Pooling()) -> Tensor:
    """``[T, n_freq, n_time]`` -> ``[T, ceil(n_time / factor)]``: reduce frequency, pool time."""
    x = values.abs() if pooling.magnitude else values
    x = x.amax(1) if pooling.freq == "max" else x.mean(1)  # [T, n_time]
    pool = (
        torch.nn.functional.max_pool1d if pooling.time == "max" else torch.nn.functional.avg_pool1d
    )
    return pool(x[:, None].float(), pooling.factor, ceil_mode=True)[:, 0]


def _standardise(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    x = x.double()
    return (x - x.mean(dims, keepdim=True)) / x.std(dims, keepdim=True, unbiased=False)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson rho of the flattened maps: mean product of per-map z-scores. ``[...]``; NaN for a
    constant map."""
    a, b = torch.broadcast_tensors(a, b)
    return (_standardise(a, (-2, -1)) * _standardise(b, (-2, -1))).mean((-2, -1)).float()


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rho of each token's row over frames (ties get average ranks). ``[..., T]``."""
    a, b = torch.broadcast_tensors(a, b)

    def ranks(x: Tensor) -> Tensor:
        return torch.from_numpy(rankdata(x.double().numpy(), axis=-1))

    return (_standardise(ranks(a), (-1,)) * _standardise(ranks(b), (-1,))).mean(-1).float()


def top_k(x: Tensor, k: int) -> Tensor:
    """Bool mask of each row's ``k`` largest frames ``[..., T, F]``."""
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.topk(k, dim=-1).indices, True)


def topk_overlap(a: Tensor, b: Tensor, k: int) -> Tensor:
    """Share of each token's top-``k`` frames that the two maps have in common. ``[..., T]``;
    chance level is ``k / F``."""
    a, b = torch.broadcast_tensors(a, b)
    k = min(k, a.shape[-1])
    return (top_k(a, k) & top_k(b, k)).sum(-1) / k


def alignment_table(
    maps: Tensor, saliency: dict[str, Tensor], layers: list[int], k: int = 10
) -> pa.Table:
    """One row per saliency method and attention map: every head, each layer's head mean
    (scope ``layer``, head -1) and the mean over all layers and heads (scope ``all``, layer -1).

    ``maps`` ``[L, H, T, F]``; ``saliency`` method -> ``[T, F]``. Spearman and top-k overlap are
    means over tokens.
    """
    n_layers, n_heads = maps.shape[:2]
    scopes = [("head", layers[i], h) for i in range(n_layers) for h in range(n_heads)]
    scopes += [("layer", layers[i], -1) for i in range(n_layers)] + [("all", -1, -1)]
    stacked = torch.cat(
        [maps.flatten(0, 1), maps.mean(1), maps.mean((0, 1))[None]]
    )  # [S, T, F] in the order of ``scopes``
    rows = []
    for method, s in saliency.items():
        metrics = zip(
            pearson(stacked, s).tolist(),
            torch.nanmean(spearman(stacked, s), -1).tolist(),
            topk_overlap(stacked, s, k).float().mean(-1).tolist(),
            strict=True,
        )
        rows += [(method, *scope, *m) for scope, m in zip(scopes, metrics, strict=True)]
    return pa.Table.from_pylist([dict(zip(TABLE.names, r, strict=True)) for r in rows], TABLE)


def frame_importance(m: Tensor) -> Tensor:
    """One score per frame from a map ``[T, F]``: each token's row normalised to sum 1, summed
    over tokens, so every token weighs the same. ``[F]``."""
    m = m.abs().double()
    return (m / m.sum(-1, keepdim=True).clamp_min(1e-30)).sum(0).float()


def deletion_masks(importance: Tensor, fractions: tuple[float, ...]) -> Tensor:
    """Frames removed at each step of a deletion curve: the ``round(f * F)`` most important for
    each fraction ``f``. bool ``[len(fractions), F]``."""
    n = importance.shape[-1]
    order = torch.argsort(importance, descending=True, stable=True)
    masks = torch.zeros(len(fractions), n, dtype=torch.bool)
    for i, f in enumerate(fractions):
        masks[i, order[: round(f * n)]] = True
    return masks


def deletion_auc(fractions: tuple[float, ...], values: np.ndarray) -> float:
    """Area under a deletion curve over ``fractions`` (trapezoids), divided by their range: the
    mean score while frames are removed. Lower means the ranking found the evidence sooner."""
    x = np.asarray(fractions, dtype=float)
    return float(np.trapezoid(values, x) / (x[-1] - x[0]))
