"""The fused forward (``exact_logits=False``): a layer's attention output and its statistics in
one pass over the scores.

The default capture lets SDPA compute the output (bit-identical logits) and scores q k^T a second
time for the statistics. The fused forward scores once: each block of query rows computes its
probabilities, the row and column statistics and ``P @ V`` together (``chunked.run_blocks`` on
any device; on a GPU the Triton row kernel with ``P @ V``, ``triton_stats.triton_fused``), and
skips every key outside the rows' causal or sliding-window band. The statistics are those of
``attention_stats``; the output matches SDPA within floating-point tolerance, not bit for bit.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from attnscope.errors import ShapeError
from attnscope.kernels import lookups
from attnscope.kernels.backends import choose
from attnscope.kernels.chunked import run_blocks
from attnscope.kernels.config import StatsConfig
from attnscope.kernels.request import build_request
from attnscope.kernels.stats import AttentionStats

REASON = "fused forward (exact_logits=False)"


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    config: StatsConfig | None = None,
    *,
    tokens: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, AttentionStats]:
    """``softmax(q k^T * scale) v`` and the statistics of that attention, in one pass.

    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``, v ``[B, Hkv, Tk, Dv]`` (as the attention interface
    receives them); ``config``, ``tokens`` and keyword arguments as ``attention_stats``. Returns
    the output ``[B, Hq, Tq, Dv]`` in q's dtype (zeros for rows that see no key) and the stats.
    """
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ShapeError(
            f"v must be [B, Hkv, Tk, Dv] matching k {tuple(k.shape)}; got {tuple(v.shape)}"
        )
    if v.device != q.device:
        raise ShapeError(f"v must be on the device of q ({q.device}), got {v.device}")
    req = build_request(q, k, config, **kwargs)
    inner = lookups.backend_request(req)
    backend, why = choose(inner, inner.config.backend)
    if backend.name == "triton":  # the row kernel with P @ V (GPU; the interpreter in tests)
        from attnscope.kernels.triton_stats import triton_fused

        stats, out = triton_fused(inner, v)
    else:  # chunked blocks on any device (also for backend="dense", which has no output)
        stats, out = run_blocks(inner, v)
    assert out is not None
    stats.reason = f"{REASON}, {stats.backend} ({why})"
    lookups.add_head_rows(req, inner, stats, tokens)  # as attention_stats adds them
    return out.to(q.dtype), stats
