"""Chunked backend: exact statistics over blocks of query rows, never the whole L x L matrix.

Memory O(B Hq block Tk). For causal and sliding-window attention each block only scores the keys
it can see, so the work is about half of the dense computation. Learned sinks enter each row's
log-normaliser (``StatsRequest.with_sink``): probabilities over the keys sum to 1 minus the sink's.
Computes and returns statistics in ``req.compute_dtype`` (float32, float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnscope.kernels.request import StatsRequest
from attnscope.kernels.stats import AttentionStats
from attnscope.kernels.table import SPAN_PREFIX
from attnscope.metrics.dense import analysed_rows, fai_selection

BLOCK_ELEMENTS = (
    1 << 22
)  # score elements per block (16 MiB of fp32), a few temporaries of this size


def chunked_stats(req: StatsRequest, block_elements: int = BLOCK_ELEMENTS) -> AttentionStats:
    b, hq, tq, _ = req.q.shape
    tk = req.k.shape[2]
    dev, dtype = req.q.device, req.compute_dtype
    block = max(1, min(tq, block_elements // max(1, b * hq * tk)))
    monotone = bool((req.k_pos[:, 1:] >= req.k_pos[:, :-1]).all()) if tk > 1 else True

    rows = {m: torch.empty(b, hq, tq, device=dev, dtype=dtype) for m in req.row_metrics}
    lse = torch.empty(b, hq, tq, device=dev, dtype=dtype)
    sums = {m: torch.zeros(b, hq, tk, device=dev, dtype=dtype) for m in req.col_metrics}
    counts = {m: torch.zeros(b, 1, tk, device=dev) for m in ("fai", "sink_score") if req.wants(m)}
    if req.mask is not None and req.mask.shape[1] > 1:  # a row may be fully masked in one head
        counts = {m: torch.zeros(b, hq, tk, device=dev) for m in counts}

    for r0 in range(0, tq, block):
        rs = slice(r0, min(tq, r0 + block))
        ks = _visible_keys(req, rs, tk) if monotone else slice(0, tk)
        if ks.stop <= ks.start:  # no key visible: every row of the block is fully masked
            for t in (*rows.values(), lse):
                t[:, :, rs] = float("nan") if t is not lse else float("-inf")
            continue
        _block(req, rs, ks, rows, lse, sums, counts)
    return AttentionStats(rows, sums, counts, lse, backend="chunked")


def _visible_keys(req: StatsRequest, rs: slice, tk: int) -> slice:
    """Key index range that any row of the block may see (positions sorted along keys)."""
    qp = req.q_pos[:, rs]
    lo, hi = 0, tk
    if req.causal:
        hi = int(torch.searchsorted(req.k_pos, qp.amax(1, keepdim=True), right=True).max())
    if req.sliding_window is not None:
        first = qp.amin(1, keepdim=True) - req.sliding_window + 1
        lo = int(torch.searchsorted(req.k_pos, first).min())
    return slice(lo, max(lo, hi))


def _block(
    req: StatsRequest,
    rs: slice,
    ks: slice,
    rows: dict[str, Tensor],
    lse_out: Tensor,
    sums: dict[str, Tensor],
    counts: dict[str, Tensor],
) -> None:
    allowed = req.allowed(rs, ks)  # [B, 1|Hq, r, k]
    s = req.scores(rs, ks).masked_fill(~allowed, float("-inf"))  # [B, Hq, r, k]
    lse = req.with_sink(torch.logsumexp(s, -1))[..., None]  # [B, Hq, r, 1], sink included
    valid = torch.isfinite(lse)  # [B, Hq, r, 1]
    p = torch.exp(s - torch.where(valid, lse, 0.0))  # masked keys -> 0; [B, Hq, r, k]
    sink = req.sink_probability(lse[..., 0]) if req.sinks is not None else None  # [B, Hq, r]
    nan = torch.tensor(float("nan"), device=s.device, dtype=s.dtype)
    lse_out[:, :, rs] = lse[..., 0]
    kp = req.k_pos[:, None, None, ks]  # [B, 1, 1, k]
    dist = (req.q_pos[:, None, rs, None] - kp).to(s.dtype)  # [B, 1, r, k]

    def weighted(weight: Tensor) -> Tensor:
        return torch.where(valid[..., 0], (p * weight).sum(-1), nan)

    for name, out in rows.items():
        if name == "entropy":  # H = sum p (lse - s), masked keys (p = 0) contributing 0
            out[:, :, rs] = weighted(torch.where(allowed, lse - s, 0.0))
            if sink is not None:  # the sink's term p_sink (lse - sink)
                out[:, :, rs] += sink * (lse[..., 0] - req.sinks.to(s.dtype)[:, None])
        elif name == "sink_logit_mass":
            out[:, :, rs] = sink
        elif name == "mean_distance":
            out[:, :, rs] = weighted(dist)
        elif name == "waad":
            out[:, :, rs] = weighted(dist.clamp(0, req.window))
        elif name == "sink_mass":
            out[:, :, rs] = weighted(((kp >= 0) & (kp < req.sink_tokens)).to(s.dtype))
        elif name == "max_attention":
            out[:, :, rs] = torch.where(valid[..., 0], p.amax(-1), nan)
        else:
            start, end = req.spans[name.removeprefix(SPAN_PREFIX)]
            out[:, :, rs] = weighted(((kp >= start) & (kp < end)).to(s.dtype))

    if not sums:
        return
    col_p = torch.where(valid, p, 0.0)  # fully masked rows give nothing to any column
    # row validity per head only where the mask differs between heads
    row_valid = valid if allowed.shape[1] > 1 else valid[:, :1]  # [B, 1|Hq, r, 1]
    if "received" in sums or "sink_score" in sums:
        got = col_p.sum(-2)  # [B, Hq, k]
        for name in ("received", "sink_score"):
            if name in sums:
                sums[name][:, :, ks] += got
    if "sink_score" in counts:
        visible = allowed & row_valid  # [B, 1|Hq, r, k]
        counts["sink_score"][:, :, ks] += visible.sum(-2).float()
    if "fai" in sums:
        row_ok = analysed_rows(row_valid, req.q_pos[:, None, rs, None], req.fai_rows)
        sel = fai_selection(dist, req.fai_horizon) & row_ok  # [B, 1|Hq, r, k]
        sums["fai"][:, :, ks] += (col_p * sel).sum(-2)
        # the count depends on positions only: keys the block cannot see still count its rows
        all_dist = req.q_pos[:, None, rs, None] - req.k_pos[:, None, None, :]  # [B, 1, r, Tk]
        counted = fai_selection(all_dist, req.fai_horizon) & row_ok  # [B, 1|Hq, r, Tk]
        counts["fai"] += counted.sum(-2).float()
