"""``attention_stats(q, k, config)``: attention metrics from queries and keys (KERNELS.md).

Backends share one contract and declare what they serve (``attnscope.kernels.backends``):
``dense`` (materialises the probabilities), ``chunked`` (PyTorch over query blocks, exact, CPU and
GPU) and ``triton`` (fused GPU kernels, when available). ``auto`` picks the fastest that can serve
the request; the result records which one ran and why. The head metrics (previous-token,
duplicate-token, induction, copy, lookback) are computed after whichever backend ran, from single
weights ``exp(score - lse)`` (``attnscope.kernels.lookups``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from attnscope.kernels import lookups
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
    tokens: Tensor | None = None,
    **kwargs: Any,
) -> AttentionStats:
    """Row and column attention statistics of ``softmax(q k^T * scale)`` without keeping it.

    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]`` (post-RoPE, ``Hq % Hkv == 0``). ``config`` says
    what to compute (``StatsConfig``); keyword arguments describe the attention call and may
    override config fields (``build_request``): ``causal=True``, ``scale=None`` (1/sqrt(D)),
    ``sliding_window``, ``softcap``, ``mask`` (key padding ``[B, Tk]`` or a full mask
    ``[B, 1|Hq, Tq, Tk]``, True = attend; a float mask is additive), ``q_pos`` / ``k_pos``
    (default: keys ``0..Tk-1``, real tokens only under a padding mask, queries aligned to the
    end), and shortcuts such as ``window=10``, ``metrics=("entropy",)`` or ``backend="chunked"``.
    ``tokens`` ``[B, N]``: the token id at each position, for the token head metrics
    (duplicate_token, induction, copy_attention).
    """
    req = build_request(q, k, config, **kwargs)
    inner = lookups.backend_request(req)
    backend, reason = choose(inner, req.config.backend)
    stats = backend.run(inner)
    stats.reason = reason
    lookups.add_head_rows(req, inner, stats, tokens)
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
