"""``attention_stats(q, k, config)``: attention metrics from queries and keys (KERNELS.md).

Backends share one contract and declare what they serve (``attnscope.kernels.backends``):
``dense`` (materialises the probabilities), ``chunked`` (PyTorch over query blocks, exact, CPU and
GPU) and ``triton`` (fused GPU kernels, when available). ``auto`` picks the fastest that can serve
the request; the result records which one ran and why.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from attnscope.kernels.backends import BACKENDS, choose
from attnscope.kernels.config import StatsConfig
from attnscope.kernels.request import build_request
from attnscope.kernels.stats import AttentionStats
from attnscope.kernels.table import COL_METRICS, METRICS, ROW_METRICS


def attention_stats(
    q: Tensor,
    k: Tensor,
    config: StatsConfig | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    mask: Tensor | None = None,
    q_pos: Tensor | None = None,
    k_pos: Tensor | None = None,
    **shortcuts: Any,
) -> AttentionStats:
    """Row and column attention statistics of ``softmax(q k^T * scale)`` without keeping it.

    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]`` (post-RoPE, ``Hq % Hkv == 0``). ``config`` says
    what to compute (``StatsConfig``; keyword ``shortcuts`` such as ``window=10``,
    ``metrics=("entropy",)`` or ``backend="chunked"`` override its fields). ``mask`` is key padding
    ``[B, Tk]`` or a full mask ``[B, 1|Hq, Tq, Tk]`` (True = attend; a float mask is additive),
    combined with ``causal`` and ``sliding_window``. Positions default to keys ``0..Tk-1`` (real
    tokens only when a padding mask is given) with queries aligned to the end.
    """
    req = build_request(
        q,
        k,
        config,
        causal=causal,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
        mask=mask,
        q_pos=q_pos,
        k_pos=k_pos,
        **shortcuts,
    )
    backend, reason = choose(req, req.config.backend)
    stats = backend.run(req)
    stats.reason = reason
    return stats


__all__ = [
    "BACKENDS",
    "COL_METRICS",
    "METRICS",
    "ROW_METRICS",
    "AttentionStats",
    "StatsConfig",
    "attention_stats",
]
