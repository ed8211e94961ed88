"""``attention_stats(q, k, ...)``: attention metrics from queries and keys (KERNELS.md).

Backends share one contract: ``dense`` (materialises the probabilities, the oracle), ``chunked``
(PyTorch over query blocks, exact, CPU and GPU) and ``triton`` (fused GPU kernels, when available).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from attnscope.errors import UnsupportedMetricError
from attnscope.kernels.chunked import chunked_stats
from attnscope.kernels.dense import dense_stats
from attnscope.kernels.request import COL_METRICS, ROW_METRICS, StatsRequest, build_request
from attnscope.kernels.stats import AttentionStats
from attnscope.metrics.dense import FAI_HORIZON, WAAD_WINDOW

BACKENDS: dict[str, Callable[[StatsRequest], AttentionStats]] = {
    "dense": dense_stats,
    "chunked": chunked_stats,
}
try:  # the fused GPU kernels need triton (Linux; CUDA, or TRITON_INTERPRET=1 on the CPU)
    from attnscope.kernels.triton_stats import triton_stats

    BACKENDS["triton"] = triton_stats
except ImportError:
    pass


def resolve_backend(backend: str, q: Tensor) -> str:
    """``auto`` picks triton on CUDA when it is registered, chunked otherwise."""
    if backend == "auto":
        return "triton" if q.is_cuda and "triton" in BACKENDS else "chunked"
    if backend not in BACKENDS:
        raise UnsupportedMetricError(
            f"unknown backend {backend!r}; available: {['auto', *BACKENDS]}"
        )
    return backend


def attention_stats(
    q: Tensor,
    k: Tensor,
    causal: bool = True,
    scale: float | None = None,
    window: int = WAAD_WINDOW,
    fai_horizon: tuple[int, int] | None = FAI_HORIZON,
    fai_rows: tuple[int, int] | None = None,
    sink_tokens: int = 1,
    spans: Mapping[str, tuple[int, int]] | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    backend: str = "auto",
    *,
    mask: Tensor | None = None,
    q_pos: Tensor | None = None,
    k_pos: Tensor | None = None,
    metrics: Sequence[str] | None = None,
) -> AttentionStats:
    """Row and column attention statistics of ``softmax(q k^T * scale)`` without keeping it.

    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]`` (post-RoPE, ``Hq % Hkv == 0``). ``mask`` is key
    padding ``[B, Tk]`` or a full mask ``[B, 1|Hq, Tq, Tk]`` (True = attend), combined with
    ``causal`` and ``sliding_window``. Positions default to keys ``0..Tk-1`` (real tokens only when
    a padding mask is given) with queries aligned to the end. ``metrics=None`` computes all of
    ``ROW_METRICS``, one ``span_mass:NAME`` per span and ``COL_METRICS``.
    """
    req = build_request(
        q,
        k,
        causal=causal,
        scale=scale,
        window=window,
        fai_horizon=fai_horizon,
        fai_rows=fai_rows,
        sink_tokens=sink_tokens,
        spans=spans,
        sliding_window=sliding_window,
        softcap=softcap,
        mask=mask,
        q_pos=q_pos,
        k_pos=k_pos,
        metrics=metrics,
    )
    return BACKENDS[resolve_backend(backend, q)](req)


__all__ = ["COL_METRICS", "ROW_METRICS", "AttentionStats", "attention_stats", "resolve_backend"]
