"""Chunked backend: exact statistics over blocks of query rows, never the whole L x L matrix.

Memory O(B Hq block Tk). Each block only scores the keys its rows can see (causal: up to the
diagonal; sliding windows: a band of ``W`` keys), so Gemma-3's 512-token sliding layers cost
O(L x 512), not O(L^2); blocks are sized so that rows x visible keys stays near
``block_elements``. Learned sinks enter each row's log-normaliser (``StatsRequest.with_sink``):
probabilities over the keys sum to 1 minus the sink's. Computes and returns statistics in
``req.compute_dtype`` (float32, float64 for float64 inputs).

Two block routines, one result. ``_band_block`` serves the common call (sorted positions shared by
the batch, no key padding, score bias or sinks; a mask only where it agrees with causality and the
window): it masks only the key ranges that cross the causal diagonal or the window edge, gets the
row statistics from row sums, one matrix-vector product (positions) and one row-wise dot (the
entropy), span masses from their own keys, and the distance-limited terms (WAAD's band, FAI's
horizon) from the few keys near the diagonal.
``_block`` serves everything else, elementwise. With ``value`` (the fused forward,
``kernels.fused``) each block also computes ``P @ V``: the layer's attention output, same pass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnscope.kernels.request import StatsRequest
from attnscope.kernels.stats import AttentionStats
from attnscope.kernels.table import SPAN_PREFIX
from attnscope.metrics.dense import analysed_rows, fai_selection

# score elements per block (2 MiB of fp32): a few temporaries of this size stay near the CPU's
# caches (measured: 1 << 20 ran the sliding layers of Gemma-3 1.3x slower); GPUs take larger blocks
BLOCK_ELEMENTS = 1 << 19
GPU_BLOCK_ELEMENTS = 1 << 24
# s - max below which exp leaves the normal range of the compute dtype
EXP_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}
MIN_ROWS = 32  # rows per block at least under a sliding window (fewer blocks, less overhead)


def chunked_stats(req: StatsRequest, block_elements: int | None = None) -> AttentionStats:
    """The ``chunked`` backend of ``attention_stats``."""
    return run_blocks(req, None, block_elements)[0]


def run_blocks(
    req: StatsRequest, value: Tensor | None, block_elements: int | None = None
) -> tuple[AttentionStats, Tensor | None]:
    """Statistics of ``req`` block by block and, with ``value`` ``[B, Hkv, Tk, Dv]``, the
    attention output ``softmax(q k^T) v`` ``[B, Hq, Tq, Dv]`` in the compute dtype."""
    b, hq, tq, _ = req.q.shape
    tk = req.k.shape[2]
    dev, dtype = req.q.device, req.compute_dtype
    if block_elements is None:
        block_elements = BLOCK_ELEMENTS if dev.type == "cpu" else GPU_BLOCK_ELEMENTS
    per_row = max(1, block_elements // max(1, b * hq))  # block rows x visible keys
    monotone = _sorted(req.k_pos)
    band = monotone and _band_request(req)

    rows = {m: torch.empty(b, hq, tq, device=dev, dtype=dtype) for m in req.row_metrics}
    lse = torch.empty(b, hq, tq, device=dev, dtype=dtype)
    sums = {m: torch.zeros(b, hq, tk, device=dev, dtype=dtype) for m in req.col_metrics}
    counts = {m: torch.zeros(b, 1, tk, device=dev) for m in ("fai", "sink_score") if req.wants(m)}
    if req.mask is not None and req.mask.shape[1] > 1:  # a row may be fully masked in one head
        counts = {m: torch.zeros(b, hq, tk, device=dev) for m in counts}
    out = None
    if value is not None:
        out = torch.zeros(b, hq, tq, value.shape[-1], device=dev, dtype=dtype)
    scaled = _BandInputs(req, value) if band else None

    r0 = 0
    while r0 < tq:
        rs = slice(r0, min(tq, r0 + _block_rows(req, r0, per_row, monotone)))
        ks = _visible_keys(req, rs, tk) if monotone else slice(0, tk)
        r0 = rs.stop
        if ks.stop <= ks.start:  # no key visible: every row of the block is fully masked
            for t in (*rows.values(), lse):
                t[:, :, rs] = float("nan") if t is not lse else float("-inf")
            if out is not None:  # as in _block: no key, no value
                out[:, :, rs] = 0.0
            continue
        if scaled is not None and _band_block(scaled, rs, ks, sums, counts, out):
            continue
        _block(req, rs, ks, rows, lse, sums, counts, value, out)
    if scaled is not None:
        scaled.finish(rows, lse)
    return AttentionStats(rows, sums, counts, lse, backend="chunked"), out


def _sorted(pos: Tensor) -> bool:
    return pos.shape[1] <= 1 or bool((pos[:, 1:] >= pos[:, :-1]).all())


def _block_rows(req: StatsRequest, r0: int, per_row: int, monotone: bool) -> int:
    """Rows of the block starting at row ``r0``: ``rows x (keys row r0 sees + rows) <= per_row``
    (causal blocks see up to ``rows`` more keys than their first row)."""
    tk = req.k.shape[2]
    width = tk
    if monotone:
        seen = _visible_keys(req, slice(r0, r0 + 1), tk)
        width = max(0, seen.stop - seen.start)
    if not req.causal and req.sliding_window is None:
        return max(1, per_row // max(1, tk))
    rows = int((-width + math.sqrt(width * width + 4 * per_row)) / 2)
    if req.sliding_window is not None:  # a block sees rows + W keys: keep the waste below 1.25x
        rows = min(rows, max(MIN_ROWS, req.sliding_window // 4))
    return max(1, rows)


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


# -- the banded block: the common call ----------------------------------------------------------
def _band_request(req: StatsRequest) -> bool:
    """Whether ``_band_block`` may serve ``req``: sorted positions shared by every sequence of the
    batch, no key padding, score bias or learned sinks, a mask (if any) shared by the heads."""
    return (
        req.key_valid is None
        and req.bias is None
        and req.sinks is None
        and (req.mask is None or req.mask.shape[1] == 1)
        and _sorted(req.q_pos)
        and bool((req.q_pos == req.q_pos[:1]).all())
        and bool((req.k_pos == req.k_pos[:1]).all())
    )


class _BandInputs:
    """What every banded block reads: queries packed per KV group, scaled keys, values, key
    features for the row statistics, shared positions."""

    def __init__(self, req: StatsRequest, value: Tensor | None) -> None:
        b, _, tq, d = req.q.shape
        hkv = req.k.shape[1]
        dtype = req.compute_dtype
        self.req = req
        scale = req.scale if req.softcap is None else 1.0  # softcap applies to s * scale
        self.q = req.q.to(dtype).reshape(b, hkv, req.groups, tq, d)  # [B, Hkv, G, Tq, D]
        # the scale on the keys: G times fewer elements than the queries
        self.kt = (req.k.to(dtype) * scale).transpose(-1, -2)  # [B, Hkv, D, Tk]
        self.v = None if value is None else value.to(dtype)  # [B, Hkv, Tk, Dv]
        self.qp, self.kp = req.q_pos[0], req.k_pos[0]  # [Tq], [Tk]
        # span masses: each span is one range of key indices (positions are sorted)
        spans = {"sink_mass": (0, req.sink_tokens)}
        spans.update({SPAN_PREFIX + n: se for n, se in req.spans.items()})
        self.span_keys = {
            name: (int(torch.searchsorted(self.kp, start)), int(torch.searchsorted(self.kp, end)))
            for name, (start, end) in spans.items()
            if req.wants(name)
        }
        # positions that count up by one: the edge masks depend only on the block's shape
        self.counting = bool((self.qp.diff() == 1).all() and (self.kp.diff() == 1).all())
        self._edges: dict[tuple[int, int, int], tuple[Tensor, Tensor, Tensor]] = {}
        # per-row sums over each row's keys, turned into statistics once at the end (``finish``)
        b, hq = req.q.shape[:2]
        sums = ["max", "l"] + [n for n in ("entropy", "mean_distance", "waad") if req.wants(n)]
        self.row_sums = {
            n: torch.zeros(b, hq, tq, device=req.q.device, dtype=dtype)
            for n in (*sums, *self.span_keys)
        }
        self.banded = torch.zeros(tq, dtype=torch.bool, device=req.q.device)  # rows served here

    def scores(self, rs: slice, ks: slice) -> Tensor:
        """Scaled (soft-capped) scores ``[B, Hq, r, k]``, one matrix product per KV group."""
        req = self.req
        q = self.q[:, :, :, rs]  # [B, Hkv, G, r, D]
        b, hkv, g, r, d = q.shape
        s = torch.matmul(q.reshape(b, hkv, g * r, d), self.kt[..., ks])  # [B, Hkv, G*r, k]
        s = s.view(b, hkv * g, r, -1)
        if req.softcap is not None:
            s = torch.tanh(s * (req.scale / req.softcap)) * req.softcap
        return s

    def keys(self, lo: int, hi: int, ks: slice) -> slice:
        """Key indices of ``ks`` with positions in ``[lo, hi]`` (relative slice into ``ks``)."""
        a = int(torch.searchsorted(self.kp, lo))
        z = int(torch.searchsorted(self.kp, hi, right=True))
        a, z = max(a, ks.start), min(z, ks.stop)
        return slice(a - ks.start, max(a, z) - ks.start)

    def finish(self, rows: dict[str, Tensor], lse: Tensor) -> None:
        """Row statistics and log-normalisers of the rows the banded blocks served, from their
        sums (NaN, and -inf, in rows that see no key)."""
        t = self.row_sums
        valid = t["l"] > 0  # a row that sees a key sums to at least 1 (its maximum's weight)
        log_l, inv_l = torch.log(t["l"]), 1.0 / t["l"]  # [B, Hq, Tq]
        every = bool(self.banded.all())

        def put(dest: Tensor, value: Tensor, fill: float) -> None:
            value = torch.where(valid, value, fill)
            dest.copy_(value if every else torch.where(self.banded, value, dest))

        put(lse, t["max"] + log_l, float("-inf"))
        for name, dest in rows.items():
            if name == "entropy":  # H = log l - sum p (s - m) / l
                value = log_l - t[name] * inv_l
            elif name == "max_attention":  # the maximum's weight is 1
                value = inv_l
            elif name == "waad":  # W - sum over the band of p (W - |t - s|) / l
                value = self.req.window - t[name] * inv_l
            else:  # mean_distance, sink_mass, span_mass:NAME
                value = t[name] * inv_l
            put(dest, value, float("nan"))

    def edge(self, rs: slice, kk: slice) -> tuple[Tensor, Tensor, Tensor]:
        """Which keys of ``kk`` the rows of ``rs`` may see by position (not beyond the causal
        diagonal or the window edge), as ``seen`` (bool), ``keep`` (1 where seen, else 0) and
        ``bias`` (0 where seen, else a large negative number), each ``[r, e]``; cached by shape
        and offset where positions count up by one."""
        key = (rs.stop - rs.start, kk.stop - kk.start, int(self.kp[kk.start] - self.qp[rs.start]))
        got = self._edges.get(key) if self.counting else None
        if got is None:
            seen = self.req.by_position(self.qp[rs, None], self.kp[None, kk])  # [r, e]
            # adding to and multiplying a view by float masks is 8x faster than masked_fill_
            keep = seen.to(self.kt.dtype)
            got = seen, keep, (1.0 - keep) * (torch.finfo(keep.dtype).min / 2)
            if self.counting:
                self._edges[key] = got
        return got


def _band_block(
    x: _BandInputs,
    rs: slice,
    ks: slice,
    sums: dict[str, Tensor],
    counts: dict[str, Tensor],
    out: Tensor | None,
) -> bool:
    """One block of the common call (``_band_request``): its rows' sums into ``x.row_sums``,
    its columns' into ``sums``. False, with nothing written, when the request's mask differs
    from what the positions allow (then ``_block`` runs)."""
    req = x.req
    qp = x.qp[rs]  # [r]
    kp = x.kp[ks]  # [k]
    t_lo, t_hi = int(qp[0]), int(qp[-1])
    win = req.sliding_window
    # keys every row of the block sees by position: the rest of ks crosses the diagonal or edge
    in_lo = t_hi - win + 1 if win is not None else None
    in_hi = t_lo if req.causal else None
    inner = x.keys(
        in_lo if in_lo is not None else int(kp[0]), in_hi if in_hi is not None else int(kp[-1]), ks
    )
    edges = [
        e
        for e in (slice(0, inner.start), slice(inner.stop, ks.stop - ks.start))
        if e.stop > e.start
    ]
    if inner.stop <= inner.start:
        edges = [slice(0, ks.stop - ks.start)]
    masks = [x.edge(rs, slice(ks.start + e.start, ks.start + e.stop)) for e in edges]
    if req.mask is not None:
        if inner.stop > inner.start:
            kk = slice(ks.start + inner.start, ks.start + inner.stop)
            if not bool(req.mask[:, :, rs, kk].all()):
                return False
        for e, (seen, _, _) in zip(edges, masks, strict=True):
            given = req.mask[:, :, rs, ks.start + e.start : ks.start + e.stop]  # [B, 1, r, e]
            if not torch.equal(given, seen.expand_as(given)):
                return False

    s = x.scores(rs, ks)  # [B, Hq, r, k]
    for e, (_, _, bias) in zip(edges, masks, strict=True):
        s[..., e] += bias  # hides the keys beyond the diagonal or window edge; through the view
    m = s.amax(-1, keepdim=True)  # [B, Hq, r, 1]
    s -= m  # s - m <= 0
    # exp of an argument whose result underflows the normal range takes the CPU's slow path
    # (denormals, 5-10x); those weights are below 1e-37 of the row's largest one: floor them
    s.clamp_(min=EXP_FLOOR[s.dtype])
    p = torch.exp(s)  # unnormalised probabilities, 1 at each row's maximum; [B, Hq, r, k]
    for e, (_, keep, _) in zip(edges, masks, strict=True):
        p[..., e] *= keep  # 0 beyond the edges: a row that sees no key sums to l = 0
    # row sums as reductions and matrix-vector products (a GEMM with a few columns is 10x slower)
    part = {name: t[:, :, rs] for name, t in x.row_sums.items()}  # [B, Hq, r] views
    x.banded[rs] = True
    part["max"].copy_(m[..., 0])
    l_sum = torch.sum(p, -1, out=part["l"])  # [B, Hq, r]
    for name, dest in part.items():
        if name == "entropy":  # sum p (s - m)
            torch.sum(s.mul_(p), -1, out=dest)  # s is not read after this (no temporary)
        elif name == "mean_distance":  # sum p |t - s|
            if req.causal:  # (t - t0) l - sum p (s - t0): positions from the block's first query
                ahead = torch.matmul(p, (kp - t_lo).to(s.dtype))  # [B, Hq, r]
                torch.sub((qp - t_lo).to(s.dtype) * l_sum, ahead, out=dest)
            else:
                dist = (qp[:, None] - kp[None, :]).to(s.dtype).abs()  # [r, k]
                torch.sum(p * dist, -1, out=dest)
        elif name == "waad":  # sum over the band |t - s| < W of p (W - |t - s|)
            w = req.window
            near = x.keys(t_lo - w + 1, t_hi + (0 if req.causal else w - 1), ks)
            d = (qp[:, None] - kp[near][None, :]).to(s.dtype).abs()  # [r, n]
            torch.sum(p[..., near] * (w - d).clamp_min(0), -1, out=dest)
        elif name in x.span_keys:  # sink_mass, span_mass:NAME: sum p over the span's keys
            a, z = x.span_keys[name]
            a, z = max(a, ks.start) - ks.start, min(z, ks.stop) - ks.start
            if z > a:
                torch.sum(p[..., a:z], -1, out=dest)
    if out is None and not sums:
        return True
    inv_l = torch.where(l_sum > 0, 1.0 / l_sum, 0.0)  # [B, Hq, r]
    if out is not None:  # P @ V per KV group, normalised
        b, hq, r, k = p.shape
        hkv = x.v.shape[1]
        pv = torch.matmul(p.view(b, hkv, -1, k), x.v[:, :, ks])  # [B, Hkv, G*r, Dv]
        out[:, :, rs] = pv.view(b, hq, r, -1) * inv_l[..., None]

    if not sums:
        return True
    got = None
    if "received" in sums or "sink_score" in sums:
        got = torch.matmul(inv_l[..., None, :], p)[..., 0, :]  # [B, Hq, k] sum_t p / l
        for name in ("received", "sink_score"):
            if name in sums:
                sums[name][:, :, ks] += got
    row_valid = l_sum[:, :1] > 0  # [B, 1, r]: the mask is shared by the heads
    if "sink_score" in counts:
        cnt = counts["sink_score"]
        cnt[:, :, ks] += row_valid.sum(-1, keepdim=True).float()
        for e, (in_view, _, _) in zip(edges, masks, strict=True):  # keys some rows cannot see
            kk = slice(ks.start + e.start, ks.start + e.stop)
            unseen = ~in_view & row_valid[..., None]  # [B, 1, r, e]
            cnt[:, :, kk] -= unseen.sum(-2).float()
    if "fai" in sums:
        _band_fai(x, rs, ks, qp, p, inv_l, row_valid, sums["fai"], counts["fai"])
    return True


def _band_fai(
    x: _BandInputs,
    rs: slice,
    ks: slice,
    qp: Tensor,
    p: Tensor,
    inv_l: Tensor,
    row_valid: Tensor,
    fai_sum: Tensor,
    fai_count: Tensor,
) -> None:
    """FAI sums over the keys within the horizon of the block's rows (a band of ``hi - lo + 1``
    keys per row) and its counts over every key the rows count for, seen or not."""
    req = x.req
    lo, hi = (1, None) if req.fai_horizon is None else req.fai_horizon
    t_lo, t_hi = int(qp[0]), int(qp[-1])
    first = int(x.kp[0]) if hi is None else t_lo - hi
    row_ok = analysed_rows(row_valid, qp[None, None], req.fai_rows)  # [B, 1, r]
    everything = slice(0, x.kp.shape[0])
    near = x.keys(first, t_hi - lo, everything)  # all keys in some row's horizon
    if near.stop <= near.start:
        return
    dist = qp[:, None] - x.kp[near][None, :]  # [r, n]
    sel = fai_selection(dist, req.fai_horizon) & row_ok[..., None]  # [B, 1, r, n]
    fai_count[:, :, near] += sel.sum(-2).float()
    seen = slice(max(near.start, ks.start), min(near.stop, ks.stop))
    if seen.stop <= seen.start:
        return
    part = sel[..., seen.start - near.start : seen.stop - near.start]  # [B, 1, r, n']
    weighted = p[..., seen.start - ks.start : seen.stop - ks.start] * part  # [B, Hq, r, n']
    fai_sum[:, :, seen] += torch.matmul(inv_l[..., None, :], weighted)[..., 0, :]


# -- the general block ----------------------------------------------------------------------------
def _block(
    req: StatsRequest,
    rs: slice,
    ks: slice,
    rows: dict[str, Tensor],
    lse_out: Tensor,
    sums: dict[str, Tensor],
    counts: dict[str, Tensor],
    value: Tensor | None = None,
    out: Tensor | None = None,
) -> None:
    """One block of any request, elementwise over ``[B, Hq, r, k]``; with ``value`` also writes
    the block's attention output into ``out`` (zeros for rows that see no key)."""
    allowed = req.allowed(rs, ks)  # [B, 1|Hq, r, k]
    blocked = ~allowed
    s = req.scores(rs, ks).masked_fill(blocked, float("-inf"))  # [B, Hq, r, k]
    lse = req.with_sink(torch.logsumexp(s, -1))[..., None]  # [B, Hq, r, 1], sink included
    valid = torch.isfinite(lse)  # [B, Hq, r, 1]
    z = (s - torch.where(valid, lse, 0.0)).clamp_(min=EXP_FLOOR[s.dtype])  # as in _band_block
    p = torch.exp(z).masked_fill_(blocked, 0.0)  # masked keys -> 0; [B, Hq, r, k]
    sink = req.sink_probability(lse[..., 0]) if req.sinks is not None else None  # [B, Hq, r]
    nan = torch.tensor(float("nan"), device=s.device, dtype=s.dtype)
    lse_out[:, :, rs] = lse[..., 0]
    kp = req.k_pos[:, None, None, ks]  # [B, 1, 1, k]
    dist = (req.q_pos[:, None, rs, None] - kp).to(s.dtype)  # [B, 1, r, k]

    def weighted(weight: Tensor) -> Tensor:
        return torch.where(valid[..., 0], (p * weight).sum(-1), nan)

    for name, dest in rows.items():
        if name == "entropy":  # H = sum p (lse - s), masked keys (p = 0) contributing 0
            dest[:, :, rs] = weighted(torch.where(allowed, lse - s, 0.0))
            if sink is not None:  # the sink's term p_sink (lse - sink)
                dest[:, :, rs] += sink * (lse[..., 0] - req.sinks.to(s.dtype)[:, None])
        elif name == "sink_logit_mass":
            dest[:, :, rs] = sink
        elif name == "mean_distance":
            dest[:, :, rs] = weighted(dist.abs())
        elif name == "waad":
            dest[:, :, rs] = weighted(dist.abs().clamp(max=req.window))
        elif name == "sink_mass":
            dest[:, :, rs] = weighted(((kp >= 0) & (kp < req.sink_tokens)).to(s.dtype))
        elif name == "max_attention":
            dest[:, :, rs] = torch.where(valid[..., 0], p.amax(-1), nan)
        else:
            start, end = req.spans[name.removeprefix(SPAN_PREFIX)]
            dest[:, :, rs] = weighted(((kp >= start) & (kp < end)).to(s.dtype))

    if out is not None:  # P @ V per KV group; p is 0 on masked keys and rows that see none
        b, hq, r, k = p.shape
        v = value[:, :, ks].to(p.dtype)  # [B, Hkv, k, Dv]
        out[:, :, rs] = torch.matmul(p.view(b, v.shape[1], -1, k), v).view(b, hq, r, -1)

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
