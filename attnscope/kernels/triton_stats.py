"""Fused Triton kernels for attention statistics (KERNELS.md): memory O(L), no L x L matrix.

Two launches: a query-major pass (FlashAttention forward without P @ V) producing every row
statistic and the log-normaliser ``lse``; then, only if column statistics are requested, a
key-major pass that loads each key tile once and walks the query tiles that can see it, with
``p = exp(s - lse_t)``. Deterministic, no atomics. Runs on CUDA, or on the CPU under
``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from attnscope.kernels.request import SPAN_PREFIX, StatsRequest
from attnscope.kernels.stats import AttentionStats

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_SPANS = 15  # plus the sink span, in a 16-wide indicator tile
NO_LIMIT = 2**62


@triton.jit
def _scores(q, k_ptrs, kv_ok, d_ok, scale, softcap, HAS_SOFTCAP: tl.constexpr, CAST: tl.constexpr):
    """Scaled (and soft-capped) fp32 scores of a query tile against one key tile. [M, N]."""
    k = tl.load(k_ptrs, mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
    if CAST:
        k = k.to(tl.float32)
    if CAST:  # fp32 inputs: full-precision dot (no tf32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale
    if HAS_SOFTCAP:  # softcap * tanh(s / softcap), tanh from exp (no libdevice in the interpreter)
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
    return s


@triton.jit
def _allowed(
    qp,
    kp,
    row_ok,
    col_ok,
    rows,
    cols,
    b,
    h,
    kvalid_ptr,
    mask_ptr,
    Tk,
    sliding,
    stride_mb,
    stride_mh,
    stride_mq,
    CAUSAL: tl.constexpr,
    HAS_SLIDING: tl.constexpr,
    HAS_KVALID: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_PER_HEAD: tl.constexpr,
):
    """Which (query, key) pairs of the tile are visible. bool [M, N]."""
    ok = row_ok[:, None] & col_ok[None, :]
    if CAUSAL:
        ok = ok & (kp[None, :] <= qp[:, None])
    if HAS_SLIDING:
        ok = ok & ((qp[:, None] - kp[None, :]) < sliding)
    if HAS_KVALID:
        kv = tl.load(kvalid_ptr + b * Tk + cols, mask=col_ok, other=0)
        ok = ok & (kv[None, :] != 0)
    if HAS_MASK:
        head = h if MASK_PER_HEAD else 0
        mk = tl.load(
            mask_ptr + b * stride_mb + head * stride_mh + rows[:, None] * stride_mq + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0,
        )
        ok = ok & (mk != 0)
    return ok


@triton.jit
def _row_kernel(
    Q,
    K,
    QPOS,
    KPOS,
    KVALID,
    MASK,
    SPAN_LO,
    SPAN_HI,
    KRANGE,
    ENT,
    DIST,
    WAAD,
    MAXA,
    SPANS,
    LSE,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_mb,
    stride_mh,
    stride_mq,
    Hq,
    Tq,
    Tk,
    D,
    groups,
    n_qtiles,
    scale,
    softcap,
    sliding,
    window,
    n_spans,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NS: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SLIDING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_KVALID: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_PER_HEAD: tl.constexpr,
    CAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // groups
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None].to(tl.int64) * stride_qt + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if CAST:
        q = q.to(tl.float32)
    qp = tl.load(QPOS + b * Tq + rows, mask=row_ok, other=0)
    ns = tl.arange(0, NS)
    span_lo = tl.load(SPAN_LO + ns, mask=ns < n_spans, other=0)
    span_hi = tl.load(SPAN_HI + ns, mask=ns < n_spans, other=0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    u = tl.zeros([BLOCK_M], tl.float32)
    x_dist = tl.zeros([BLOCK_M], tl.float32)
    x_waad = tl.zeros([BLOCK_M], tl.float32)
    x_span = tl.zeros([BLOCK_M, NS], tl.float32)
    k_lo = tl.load(KRANGE + (b * n_qtiles + pid_m) * 2)
    k_hi = tl.load(KRANGE + (b * n_qtiles + pid_m) * 2 + 1)
    for start in range(k_lo, k_hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < k_hi
        k_ptrs = (
            K + b * stride_kb + hk * stride_kh + cols[:, None].to(tl.int64) * stride_kt + d[None, :]
        )
        s = _scores(q, k_ptrs, col_ok, d_ok, scale, softcap, HAS_SOFTCAP, CAST)
        kp = tl.load(KPOS + b * Tk + cols, mask=col_ok, other=0)
        ok = _allowed(
            qp,
            kp,
            row_ok,
            col_ok,
            rows,
            cols,
            b,
            h,
            KVALID,
            MASK,
            Tk,
            sliding,
            stride_mb,
            stride_mh,
            stride_mq,
            CAUSAL,
            HAS_SLIDING,
            HAS_KVALID,
            HAS_MASK,
            MASK_PER_HEAD,
        )
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        rel = tl.where(ok, s - m_safe[:, None], 0.0)
        dist = (qp[:, None] - kp[None, :]).to(tl.float32)
        shift = tl.where(l_sum > 0, m - m_safe, 0.0)  # no 0 * -inf before the first key
        u = alpha * (u + l_sum * shift) + tl.sum(p * rel, 1)
        l_sum = alpha * l_sum + tl.sum(p, 1)
        x_dist = alpha * x_dist + tl.sum(p * dist, 1)
        x_waad = alpha * x_waad + tl.sum(p * tl.minimum(tl.maximum(dist, 0.0), window), 1)
        inside = (kp[:, None] >= span_lo[None, :]) & (kp[:, None] < span_hi[None, :])
        x_span = alpha[:, None] * x_span + tl.dot(p, inside.to(tl.float32), input_precision="ieee")
        m = m_new

    valid = l_sum > 0
    safe_l = tl.where(valid, l_sum, 1.0)
    nan = float("nan")
    out = bh.to(tl.int64) * Tq + rows
    tl.store(LSE + out, tl.where(valid, m + tl.log(safe_l), float("-inf")), mask=row_ok)
    tl.store(ENT + out, tl.where(valid, tl.log(safe_l) - u / safe_l, nan), mask=row_ok)
    tl.store(DIST + out, tl.where(valid, x_dist / safe_l, nan), mask=row_ok)
    tl.store(WAAD + out, tl.where(valid, x_waad / safe_l, nan), mask=row_ok)
    tl.store(MAXA + out, tl.where(valid, 1.0 / safe_l, nan), mask=row_ok)
    span_out = SPANS + (bh.to(tl.int64) * NS + ns[None, :]) * Tq + rows[:, None]
    tl.store(
        span_out,
        tl.where(valid[:, None], x_span / safe_l[:, None], nan),
        mask=row_ok[:, None] & (ns[None, :] < n_spans),
    )


@triton.jit
def _col_kernel(
    Q,
    K,
    QPOS,
    KPOS,
    KVALID,
    MASK,
    LSE,
    QRANGE,
    RECV,
    FAI_SUM,
    FAI_CNT,
    VIS_CNT,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_mb,
    stride_mh,
    stride_mq,
    Hq,
    Tq,
    Tk,
    D,
    groups,
    n_ktiles,
    scale,
    softcap,
    sliding,
    fai_lo,
    fai_hi,
    rows_lo,
    rows_hi,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SLIDING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_KVALID: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_PER_HEAD: tl.constexpr,
    CAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // groups
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Tk
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    k_ptrs = (
        K + b * stride_kb + hk * stride_kh + cols[:, None].to(tl.int64) * stride_kt + d[None, :]
    )
    kp = tl.load(KPOS + b * Tk + cols, mask=col_ok, other=0)
    recv = tl.zeros([BLOCK_N], tl.float32)
    fai_sum = tl.zeros([BLOCK_N], tl.float32)
    fai_cnt = tl.zeros([BLOCK_N], tl.float32)
    vis_cnt = tl.zeros([BLOCK_N], tl.float32)
    r_lo = tl.load(QRANGE + (b * n_ktiles + pid_n) * 2)
    r_hi = tl.load(QRANGE + (b * n_ktiles + pid_n) * 2 + 1)
    for start in range(r_lo, r_hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < r_hi
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + rows[:, None].to(tl.int64) * stride_qt + d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if CAST:
            q = q.to(tl.float32)
        qp = tl.load(QPOS + b * Tq + rows, mask=row_ok, other=0)
        lse = tl.load(LSE + bh.to(tl.int64) * Tq + rows, mask=row_ok, other=float("-inf"))
        row_valid = row_ok & (lse > float("-inf"))
        s = _scores(q, k_ptrs, col_ok, d_ok, scale, softcap, HAS_SOFTCAP, CAST)
        ok = _allowed(
            qp,
            kp,
            row_ok,
            col_ok,
            rows,
            cols,
            b,
            h,
            KVALID,
            MASK,
            Tk,
            sliding,
            stride_mb,
            stride_mh,
            stride_mq,
            CAUSAL,
            HAS_SLIDING,
            HAS_KVALID,
            HAS_MASK,
            MASK_PER_HEAD,
        )
        ok = ok & row_valid[:, None]
        p = tl.where(ok, tl.exp(s - tl.where(row_valid, lse, 0.0)[:, None]), 0.0)
        recv += tl.sum(p, 0)
        vis_cnt += tl.sum(ok.to(tl.float32), 0)
        dist = qp[:, None] - kp[None, :]
        in_rows = row_valid & (qp >= rows_lo) & (qp < rows_hi)
        sel = (dist >= fai_lo) & (dist <= fai_hi) & in_rows[:, None] & col_ok[None, :]
        fai_sum += tl.sum(tl.where(sel, p, 0.0), 0)
        fai_cnt += tl.sum(sel.to(tl.float32), 0)
    out = bh.to(tl.int64) * Tk + cols
    tl.store(RECV + out, recv, mask=col_ok)
    tl.store(FAI_SUM + out, fai_sum, mask=col_ok)
    tl.store(FAI_CNT + out, fai_cnt, mask=col_ok)
    tl.store(VIS_CNT + out, vis_cnt, mask=col_ok)


def _alloc(*shape: int, device: torch.device) -> torch.Tensor:
    """Output buffers; every element is written by a kernel (tests poison this to check)."""
    return torch.empty(shape, device=device, dtype=torch.float32)


def _tile_ranges(
    sorted_pos: torch.Tensor, lo_pos: torch.Tensor, hi_pos: torch.Tensor
) -> torch.Tensor:
    """Index ranges [lo, hi) of ``sorted_pos`` [B, T] holding positions in [lo_pos, hi_pos]
    for each tile; lo_pos and hi_pos are [B, n_tiles]. Returns int64 [B, n_tiles, 2]."""
    lo = torch.searchsorted(sorted_pos, lo_pos)
    hi = torch.searchsorted(sorted_pos, hi_pos, right=True)
    return torch.stack([lo, torch.maximum(lo, hi)], -1).to(torch.int64).contiguous()


def _tile_bounds(pos: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest position in each tile of ``pos`` [B, T]. [B, n_tiles] each."""
    b, t = pos.shape
    pad = triton.cdiv(t, block) * block - t
    low = torch.nn.functional.pad(pos, (0, pad), value=NO_LIMIT).view(b, -1, block)
    high = torch.nn.functional.pad(pos, (0, pad), value=-NO_LIMIT).view(b, -1, block)
    return low.amin(-1), high.amax(-1)


def triton_stats(req: StatsRequest) -> AttentionStats:
    """The ``triton`` backend of ``attention_stats`` (what it serves: ``kernels.backends``)."""
    q, k = req.q.contiguous(), req.k.contiguous()
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    dev = q.device
    block_m, block_n = (32, 32) if INTERPRET else (64, 64)
    block_d = max(16, triton.next_power_of_2(d))
    cast = INTERPRET or q.dtype == torch.float32
    flags = dict(
        CAUSAL=req.causal,
        HAS_SLIDING=req.sliding_window is not None,
        HAS_SOFTCAP=req.softcap is not None,
        HAS_KVALID=req.key_valid is not None,
        HAS_MASK=req.mask is not None,
        MASK_PER_HEAD=req.mask is not None and req.mask.shape[1] > 1,
        CAST=cast,
    )
    kvalid = (
        (req.key_valid if req.key_valid is not None else torch.ones(1, device=dev))
        .to(torch.uint8)
        .contiguous()
    )
    mask = (
        (req.mask if req.mask is not None else torch.ones(1, 1, 1, 1, device=dev))
        .to(torch.uint8)
        .contiguous()
    )
    mstride = (mask.stride(0), mask.stride(1), mask.stride(2))
    sliding = req.sliding_window or 0
    softcap = req.softcap or 1.0
    monotone = tk <= 1 or bool((req.k_pos[:, 1:] >= req.k_pos[:, :-1]).all())
    q_monotone = tq <= 1 or bool((req.q_pos[:, 1:] >= req.q_pos[:, :-1]).all())

    # keys each query tile may see (all keys unless positions are sorted)
    n_qt = triton.cdiv(tq, block_m)
    q_min, q_max = _tile_bounds(req.q_pos, block_m)
    k_lo_pos = (
        q_min - req.sliding_window + 1 if req.sliding_window else torch.full_like(q_min, -NO_LIMIT)
    )
    k_hi_pos = q_max if req.causal else torch.full_like(q_max, NO_LIMIT)
    if monotone:
        krange = _tile_ranges(req.k_pos, k_lo_pos, k_hi_pos)
    else:
        krange = torch.tensor([0, tk], device=dev).expand(b, n_qt, 2).contiguous()

    spans = [(0, req.sink_tokens), *req.spans.values()]
    span_lo = torch.tensor([s for s, _ in spans], dtype=torch.int64, device=dev)
    span_hi = torch.tensor([e for _, e in spans], dtype=torch.int64, device=dev)
    ent, dist, waad, maxa, lse = (_alloc(b, hq, tq, device=dev) for _ in range(5))
    span_out = _alloc(b, hq, 16, tq, device=dev)
    _row_kernel[(n_qt, b * hq)](
        q,
        k,
        req.q_pos,
        req.k_pos,
        kvalid,
        mask,
        span_lo,
        span_hi,
        krange,
        ent,
        dist,
        waad,
        maxa,
        span_out,
        lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        *mstride,
        hq,
        tq,
        tk,
        d,
        req.groups,
        n_qt,
        req.scale,
        softcap,
        sliding,
        float(req.window),
        len(spans),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        NS=16,
        **flags,
    )
    all_rows = {
        "entropy": ent,
        "mean_distance": dist,
        "waad": waad,
        "max_attention": maxa,
        "sink_mass": span_out[:, :, 0],
    }
    for i, name in enumerate(req.spans, start=1):
        all_rows[SPAN_PREFIX + name] = span_out[:, :, i]
    rows = {n: all_rows[n].contiguous() for n in req.row_metrics}

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    if req.col_metrics:
        n_kt = triton.cdiv(tk, block_n)
        k_min, k_max = _tile_bounds(req.k_pos, block_n)
        r_lo_pos = k_min if req.causal else torch.full_like(k_min, -NO_LIMIT)
        r_hi_pos = torch.full_like(k_max, NO_LIMIT)
        if q_monotone:
            qrange = _tile_ranges(req.q_pos, r_lo_pos, r_hi_pos)
        else:
            qrange = torch.tensor([0, tq], device=dev).expand(b, n_kt, 2).contiguous()
        fai_lo, fai_hi = (1, NO_LIMIT) if req.fai_horizon is None else req.fai_horizon
        rows_lo, rows_hi = req.fai_rows or (-NO_LIMIT, NO_LIMIT)
        recv, fai_sum, fai_cnt, vis_cnt = (_alloc(b, hq, tk, device=dev) for _ in range(4))
        _col_kernel[(n_kt, b * hq)](
            q,
            k,
            req.q_pos,
            req.k_pos,
            kvalid,
            mask,
            lse,
            qrange,
            recv,
            fai_sum,
            fai_cnt,
            vis_cnt,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            *mstride,
            hq,
            tq,
            tk,
            d,
            req.groups,
            n_kt,
            req.scale,
            softcap,
            sliding,
            fai_lo,
            fai_hi,
            rows_lo,
            rows_hi,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            **flags,
        )
        if req.wants("received"):
            sums["received"] = recv
        if req.wants("sink_score"):
            sums["sink_score"], counts["sink_score"] = recv, vis_cnt
        if req.wants("fai"):
            sums["fai"], counts["fai"] = fai_sum, fai_cnt
    return AttentionStats(rows, sums, counts, lse, backend="triton")
