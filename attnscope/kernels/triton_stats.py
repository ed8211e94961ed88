"""Fused Triton kernels for attention statistics (KERNELS.md): memory O(L), no L x L matrix.

Two launches: a query-major pass (FlashAttention forward without P @ V) producing every row
statistic and the log-normaliser ``lse``; then, only if column statistics are requested, a
key-major pass that loads each key tile once and walks the query tiles that can see it, with
``p = exp(s - lse_t)``. Deterministic, no atomics.

- The query heads of a KV group share a tile (``launch.TileConfig.heads``): row ``r`` of a tile
  is head ``r // BLOCK_T`` of the group's chunk at position ``t0 + r % BLOCK_T``.
- Scores are in log2 units (the scale and log2(e) folded into one multiply, ``exp2``).
- The host gives each query the key index range it may see and the range it sees entirely (and
  each key the same for queries); only tiles outside the entirely seen range evaluate masks
  (causal diagonal, sliding window, padding, full masks, the ragged end). Masked scores are a
  finite ``NEG``, so ``exp2`` gives 0 without ``inf - inf``.
- Learned sinks (gpt-oss) start each row's running state as one virtual key: ``m = sink``,
  ``l = 1``, ``u = 0``.

Runs on CUDA, autotuned over the candidates of ``launch`` per head dim, or on the CPU under
``TRITON_INTERPRET=1`` (tests) with the interpreter's fixed configuration.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from attnscope.kernels.launch import Kind, Pass, TileConfig, block_d, candidates, size_class
from attnscope.kernels.request import SPAN_PREFIX, StatsRequest
from attnscope.kernels.stats import AttentionStats

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_SPANS = 15  # plus the sink span, in a 16-wide indicator tile
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
NEG: tl.constexpr = tl.constexpr(-1.0e30)  # a masked score (log2 units)
FAR: tl.constexpr = tl.constexpr(2**62)  # beyond any position
NO_REACH = 2**40  # further than any distance (host side)


@triton.jit
def _group(pid, Hkv, groups, GP: tl.constexpr):
    """Batch, KV head and chunk of ``GP`` query heads of program ``pid`` (grid axis 1)."""
    n_chunks = tl.cdiv(groups, GP)
    bk = pid // n_chunks
    return (bk // Hkv).to(tl.int64), (bk % Hkv).to(tl.int64), pid % n_chunks


@triton.jit
def _rows(t0, chunk, hk, groups, T, BLOCK_T: tl.constexpr, GP: tl.constexpr):
    """Positions, query heads and validity of the ``GP * BLOCK_T`` rows of a packed tile."""
    r = tl.arange(0, GP * BLOCK_T)
    g = chunk * GP + r // BLOCK_T
    t = t0 + r % BLOCK_T
    return t, hk * groups + g, (t < T) & (g < groups)


@triton.jit
def _load(X, offsets, ok, D: tl.constexpr, BLOCK_D: tl.constexpr, CAST: tl.constexpr):
    """Rows ``X + offsets`` [R] of D elements, zero-padded to BLOCK_D. [R, BLOCK_D]."""
    d = tl.arange(0, BLOCK_D)
    x = tl.load(X + offsets[:, None] + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0)
    if CAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _scores(a, b, scale, softcap, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Scaled (and soft-capped) scores ``a b^T`` of two tiles [A, D] and [B, D] in log2 units
    (rows of queries against keys, or of keys against queries). [A, B]."""
    return _scaled(tl.dot(a, tl.trans(b), input_precision=PRECISION), scale, softcap, HAS_SOFTCAP)


@triton.jit
def _scaled(s, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Dot products ``s`` as scaled (and soft-capped) scores in log2 units."""
    if HAS_SOFTCAP:  # softcap * tanh(s / softcap), tanh from exp (no libdevice in the interpreter)
        s = s * scale
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0)) * LOG2E
    else:
        s = s * (scale * LOG2E)
    return s


@triton.jit
def _tile_range(
    RANGE, b, i0, n, n_other, BLOCK: tl.constexpr, STEP: tl.constexpr, ALIGN32: tl.constexpr
):
    """Index range [lo, hi) of the other axis that the BLOCK entries from ``i0`` may see, and the
    tile starts [first, last) (steps of STEP from lo) inside the range all of them see entirely.
    ``RANGE`` is int32 [B, n, 4]: lo, hi, entirely-seen lo, entirely-seen hi per entry. With
    ALIGN32, lo is a multiple of 32 (tiles of the other axis start on a mask word)."""
    i = i0 + tl.arange(0, BLOCK)
    ok = i < n
    ptr = RANGE + (b * n + i) * 4
    lo = tl.min(tl.load(ptr, mask=ok, other=n_other), 0)
    if ALIGN32:
        lo = lo // 32 * 32
    hi = tl.max(tl.load(ptr + 1, mask=ok, other=0), 0)
    in_lo = tl.max(tl.load(ptr + 2, mask=ok, other=0), 0)
    in_hi = tl.min(tl.load(ptr + 3, mask=ok, other=n_other), 0)
    first = lo + tl.cdiv(tl.maximum(in_lo - lo, 0), STEP) * STEP
    last = first + tl.maximum(in_hi - first, 0) // STEP * STEP
    return lo, hi, first, last


@triton.jit
def _visible(
    ok,
    dist,
    start,
    cols,
    col_ok,
    mask_rows,
    KVALID,
    MASK,
    n_words,
    sliding,
    CAUSAL: tl.constexpr,
    HAS_SLIDING: tl.constexpr,
    HAS_KVALID: tl.constexpr,
    HAS_MASK: tl.constexpr,
    KEYS_FIRST: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Which (query, key) pairs of a tile are visible: ``ok`` the pairs of real rows and keys,
    ``dist`` q_pos - k_pos (fp32, exact), both [rows, keys], or [keys, rows] with KEYS_FIRST.
    Keys ``cols`` [N] from ``start``; ``KVALID`` the batch row's padding flags; ``mask_rows``
    [R] where each row's bit words start in ``MASK`` (``-1``: no row). Only 1-D loads."""
    if CAUSAL:
        ok = ok & (dist >= 0)
    if HAS_SLIDING:
        ok = ok & (dist < sliding)
    if HAS_KVALID:
        kv = tl.load(KVALID + cols, mask=col_ok, other=0) != 0
        ok = ok & (kv[:, None] if KEYS_FIRST else kv[None, :])
    if HAS_MASK:  # a tile spans W words of 32 keys from word0 (tiles start at multiples of 32)
        W: tl.constexpr = (BLOCK_N + 31) // 32
        word0 = start // 32
        word = cols // 32 - word0
        shift = cols % 32
        bits = tl.zeros_like(dist).to(tl.int32)
        for j in tl.static_range(W):  # words past the row's last hold keys past Tk: not col_ok
            w_idx = tl.minimum(word0 + j, n_words - 1)
            w = tl.load(MASK + mask_rows + w_idx, mask=mask_rows >= 0, other=0)
            if KEYS_FIRST:
                bits = tl.where((word == j)[:, None], w[None, :], bits)
            else:
                bits = tl.where((word == j)[None, :], w[:, None], bits)
        ok = ok & (((bits >> (shift[:, None] if KEYS_FIRST else shift[None, :])) & 1) != 0)
    return ok


@triton.jit
def _per_head(x, GP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sums over the rows of each query head of a transposed packed tile [N, GP * BLOCK_T]:
    one column sum per key and head. [N, GP]."""
    return tl.sum(tl.reshape(x, [BLOCK_N, GP, BLOCK_T]), 2)


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
    SINKS,
    ENT,
    DIST,
    WAAD,
    MAXA,
    SPANS,
    SINKP,
    LSE,
    V,
    OUT,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_mb,
    stride_mh,
    stride_mq,
    stride_vb,
    stride_vh,
    stride_vt,
    Hkv,
    Tq,
    Tk,
    groups,
    scale,
    softcap,
    sliding,
    window,
    n_spans,
    n_words,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NS: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SLIDING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_KVALID: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HAS_V: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GP: tl.constexpr,
    SPLIT_D: tl.constexpr,
):
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    BLOCK_DS: tl.constexpr = BLOCK_D // SPLIT_D  # head dim slice of a score dot
    tl.static_assert(BLOCK_DS >= 16)
    t0 = tl.program_id(0) * BLOCK_T
    b, hk, chunk = _group(tl.program_id(1), Hkv, groups, GP)
    t, h, row_ok = _rows(t0, chunk, hk, groups, Tq, BLOCK_T, GP)
    q_offsets = b * stride_qb + h * stride_qh + t.to(tl.int64) * stride_qt
    if SPLIT_D == 1:  # the query tile stays in registers
        q = _load(Q, q_offsets, row_ok, D, BLOCK_D, CAST)
    qp = tl.load(QPOS + b * Tq + t, mask=row_ok, other=0)
    qp0 = tl.min(tl.where(row_ok, qp, FAR), 0)  # distances relative to it are exact in fp32
    qp_rel = (qp - qp0).to(tl.float32)
    lo, hi, first, last = _tile_range(KRANGE, b, t0, Tq, Tk, BLOCK_T, BLOCK_N, HAS_MASK)
    ns = tl.arange(0, NS)
    ns_ok = ns < n_spans
    span_lo = tl.load(SPAN_LO + ns, mask=ns_ok, other=FAR)
    span_hi = tl.load(SPAN_HI + ns, mask=ns_ok, other=-FAR)

    # running state per row (log2 units): max m, normaliser l, u = sum p (s - m), sums of
    # p * k_pos, of p * (W - min(|t - s|, W)) and of p over each span
    if HAS_SINKS:  # the sink is a virtual key: m = sink, l = 1, u = 0; l_keys counts keys only
        sink = tl.load(SINKS + h, mask=row_ok, other=0.0) * LOG2E
        m = sink
        l_sum = tl.full([BLOCK_M], 1.0, tl.float32)
        l_keys = tl.zeros([BLOCK_M], tl.float32)
        m_keys = tl.full([BLOCK_M], float("-inf"), tl.float32)
    else:
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_M], tl.float32)
    u = tl.zeros([BLOCK_M], tl.float32)
    x_kp = tl.zeros([BLOCK_M], tl.float32)
    x_ahead = tl.zeros([BLOCK_M], tl.float32)  # sum p * (s - t) over keys after t (bidirectional)
    x_near = tl.zeros([BLOCK_M], tl.float32)
    x_span = tl.zeros([BLOCK_M, NS], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)  # P @ V (the fused forward)
    v_base = V + b * stride_vb + hk * stride_vh
    k_base = K + b * stride_kb + hk * stride_kh
    mask_rows = tl.where(row_ok, b * stride_mb + h * stride_mh + t.to(tl.int64) * stride_mq, -1)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < Tk
        k_offsets = cols.to(tl.int64) * stride_kt
        if SPLIT_D == 1:
            k = _load(k_base, k_offsets, col_ok, D, BLOCK_D, CAST)
            s = _scores(q, k, scale, softcap, HAS_SOFTCAP, PRECISION)
        else:  # slices of the head dim, the query's reloaded per key tile: fewer registers
            s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for c in tl.static_range(SPLIT_D):
                d0 = c * BLOCK_DS
                q_slice = _load(Q + d0, q_offsets, row_ok, D - d0, BLOCK_DS, CAST)
                k_slice = _load(k_base + d0, k_offsets, col_ok, D - d0, BLOCK_DS, CAST)
                s += tl.dot(q_slice, tl.trans(k_slice), input_precision=PRECISION)
            s = _scaled(s, scale, softcap, HAS_SOFTCAP)
        kp = tl.load(KPOS + b * Tk + cols, mask=col_ok, other=0)
        kp_rel = (kp - qp0).to(tl.float32)
        if (start < first) | (start >= last):  # the tile crosses a boundary: mask it
            ok = _visible(
                row_ok[:, None] & col_ok[None, :],
                qp_rel[:, None] - kp_rel[None, :],
                start,
                cols,
                col_ok,
                mask_rows,
                KVALID + b * Tk,
                MASK,
                n_words,
                sliding,
                CAUSAL,
                HAS_SLIDING,
                HAS_KVALID,
                HAS_MASK,
                False,
                BLOCK_N,
            )
            s = tl.where(ok, s, NEG)
        m_tile = tl.max(s, 1)
        m_new = tl.maximum(m, m_tile)
        m_safe = tl.where(m_new > NEG, m_new, 0.0)  # rows that have seen no key yet
        alpha = tl.exp2(m - m_safe)
        rel = s - m_safe[:, None]
        p = tl.exp2(rel)
        p_sum = tl.sum(p, 1)
        shift = tl.where(l_sum > 0, m - m_safe, 0.0)  # no 0 * -inf before the first key
        u = alpha * (u + l_sum * shift) + tl.sum(p * rel, 1)
        l_sum = alpha * l_sum + p_sum
        x_kp = alpha * x_kp + tl.sum(p * kp_rel[None, :], 1)
        if not CAUSAL:  # |t - s| = (t - s) + 2 max(s - t, 0)
            ahead = tl.maximum(kp_rel[None, :] - qp_rel[:, None], 0.0)
            x_ahead = alpha * x_ahead + tl.sum(p * ahead, 1)
        if HAS_SINKS:
            l_keys = alpha * l_keys + p_sum
            m_keys = tl.maximum(m_keys, m_tile)
        if tl.max(tl.where(col_ok, kp_rel, -window), 0) > -window:  # some key within W
            near = window - tl.minimum(tl.abs(qp_rel[:, None] - kp_rel[None, :]), window)
            x_near = alpha * x_near + tl.sum(p * near, 1)
        else:
            x_near = alpha * x_near
        kp_lo = tl.min(tl.where(col_ok, kp, FAR), 0)
        kp_hi = tl.max(tl.where(col_ok, kp, -FAR), 0)
        if tl.max(((span_lo <= kp_hi) & (span_hi > kp_lo)).to(tl.int32), 0) > 0:
            if NS == 1:  # the sink span alone: a masked row sum
                inside = (kp >= tl.load(SPAN_LO)) & (kp < tl.load(SPAN_HI))
                x_span = (
                    alpha[:, None] * x_span + tl.sum(tl.where(inside[None, :], p, 0.0), 1)[:, None]
                )
            else:  # tf32 on half inputs: 0/1 indicators are exact, p to 2^-11 relative
                inside = (kp[:, None] >= span_lo[None, :]) & (kp[:, None] < span_hi[None, :])
                x_span = alpha[:, None] * x_span + tl.dot(
                    p, inside.to(tl.float32), input_precision=PRECISION
                )
        else:
            x_span = alpha[:, None] * x_span
        if HAS_V:  # FlashAttention's forward: rescale, then add this tile's P @ V
            v = _load(v_base, cols.to(tl.int64) * stride_vt, col_ok, DV, BLOCK_DV, CAST)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    if HAS_SINKS:
        valid = m_keys > NEG  # rows that see no key stay NaN, lse -inf, even with a sink
    else:
        valid = m > NEG
        l_keys = l_sum
    safe_l = tl.where(valid, l_sum, 1.0)
    log_l = tl.log2(safe_l)
    lse2 = m + log_l
    nan = float("nan")
    out = (b * Hkv * groups + h) * Tq + t
    tl.store(LSE + out, tl.where(valid, lse2 * LN2, float("-inf")), mask=row_ok)
    tl.store(ENT + out, tl.where(valid, (log_l - u / safe_l) * LN2, nan), mask=row_ok)
    dist = qp_rel * l_keys - x_kp + 2.0 * x_ahead
    tl.store(DIST + out, tl.where(valid, dist / safe_l, nan), mask=row_ok)
    tl.store(WAAD + out, tl.where(valid, (window * l_keys - x_near) / safe_l, nan), mask=row_ok)
    if HAS_SINKS:
        tl.store(MAXA + out, tl.where(valid, tl.exp2(m_keys - lse2), nan), mask=row_ok)
        tl.store(SINKP + out, tl.where(valid, tl.exp2(sink - lse2), nan), mask=row_ok)
    else:
        tl.store(MAXA + out, tl.where(valid, 1.0 / safe_l, nan), mask=row_ok)
    if HAS_V:  # [B, Hq, Tq, DV] fp32; rows that see no key give 0
        dv = tl.arange(0, BLOCK_DV)
        tl.store(
            OUT + out[:, None] * DV + dv[None, :],
            acc / safe_l[:, None],
            mask=row_ok[:, None] & (dv[None, :] < DV),
        )
    span_out = SPANS + ((b * Hkv * groups + h)[:, None] * NS + ns[None, :]) * Tq + t[:, None]
    tl.store(
        span_out,
        tl.where(valid[:, None], x_span / safe_l[:, None], nan),
        mask=row_ok[:, None] & ns_ok[None, :],
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
    Hkv,
    Tq,
    Tk,
    groups,
    scale,
    softcap,
    sliding,
    fai_lo,
    fai_hi,
    rows_lo,
    rows_hi,
    n_words,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SLIDING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_KVALID: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_FAI: tl.constexpr,
    CAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GP: tl.constexpr,
):
    # transposed tiles [keys, rows]: the key tile is the dot's first operand, staged once; query
    # tiles stream as the second (as in FlashAttention's backward pass). Keys first keeps the
    # compiler from re-staging the key tile in shared memory on every step.
    BLOCK_T: tl.constexpr = BLOCK_M // GP
    c0 = tl.program_id(0) * BLOCK_N
    b, hk, chunk = _group(tl.program_id(1), Hkv, groups, GP)
    cols = c0 + tl.arange(0, BLOCK_N)
    col_ok = cols < Tk
    k_offsets = b * stride_kb + hk * stride_kh + cols.to(tl.int64) * stride_kt
    k = _load(K, k_offsets, col_ok, D, BLOCK_D, CAST)
    kp = tl.load(KPOS + b * Tk + cols, mask=col_ok, other=0)
    kp0 = tl.min(tl.where(col_ok, kp, FAR), 0)  # distances relative to it are exact in fp32
    kp_rel = (kp - kp0).to(tl.float32)
    kp_top = tl.max(tl.where(col_ok, kp_rel, 0.0), 0)
    lo, hi, first, last = _tile_range(QRANGE, b, c0, Tk, Tq, BLOCK_N, BLOCK_T, False)
    recv = tl.zeros([BLOCK_N, GP], tl.float32)
    vis_cnt = tl.zeros([BLOCK_N, GP], tl.float32)
    fai_sum = tl.zeros([BLOCK_N, GP], tl.float32)
    fai_cnt = tl.zeros([BLOCK_N, GP], tl.float32)
    for start in range(lo, hi, BLOCK_T):
        t, h, row_ok = _rows(start, chunk, hk, groups, Tq, BLOCK_T, GP)
        q_offsets = b * stride_qb + h * stride_qh + t.to(tl.int64) * stride_qt
        q = _load(Q, q_offsets, row_ok, D, BLOCK_D, CAST)
        qp = tl.load(QPOS + b * Tq + t, mask=row_ok, other=0)
        qp_rel = (qp - kp0).to(tl.float32)
        lse = tl.load(LSE + (b * Hkv * groups + h) * Tq + t, mask=row_ok, other=float("-inf"))
        row_valid = row_ok & (lse > float("-inf"))
        lse2 = tl.where(row_valid, lse * LOG2E, float("inf"))  # invalid rows: p = 0
        s = _scores(k, q, scale, softcap, HAS_SOFTCAP, PRECISION)  # [N, M]
        if (start < first) | (start >= last):  # the tile crosses a boundary: mask it
            mask_rows = b * stride_mb + h * stride_mh + t.to(tl.int64) * stride_mq
            ok = _visible(
                col_ok[:, None] & row_valid[None, :],
                qp_rel[None, :] - kp_rel[:, None],
                c0,
                cols,
                col_ok,
                tl.where(row_valid, mask_rows, -1),
                KVALID + b * Tk,
                MASK,
                n_words,
                sliding,
                CAUSAL,
                HAS_SLIDING,
                HAS_KVALID,
                HAS_MASK,
                True,
                BLOCK_N,
            )
            s = tl.where(ok, s, NEG)
            vis_cnt += _per_head(ok.to(tl.float32), GP, BLOCK_T, BLOCK_N)
        else:
            seen = tl.sum(tl.reshape(row_valid.to(tl.float32), [GP, BLOCK_T]), 1)
            vis_cnt += seen[None, :]
        p = tl.exp2(s - lse2[None, :])
        recv += _per_head(p, GP, BLOCK_T, BLOCK_N)
        if HAS_FAI:
            counted = row_valid & (qp >= rows_lo) & (qp < rows_hi)
            q_lo = tl.min(tl.where(counted, qp_rel, float("inf")), 0)
            q_hi = tl.max(tl.where(counted, qp_rel, float("-inf")), 0)
            if (q_hi >= fai_lo) & (q_lo - kp_top <= fai_hi):  # some pair within the horizon
                dist = qp_rel[None, :] - kp_rel[:, None]
                sel = (dist >= fai_lo) & (dist <= fai_hi) & counted[None, :]
                fai_sum += _per_head(tl.where(sel, p, 0.0), GP, BLOCK_T, BLOCK_N)
                fai_cnt += _per_head(sel.to(tl.float32), GP, BLOCK_T, BLOCK_N)
    g = chunk * GP + tl.arange(0, GP)
    out = (b * Hkv * groups + hk * groups + g)[None, :] * Tk + cols[:, None]
    ok = col_ok[:, None] & (g < groups)[None, :]
    tl.store(RECV + out, recv, mask=ok)
    tl.store(VIS_CNT + out, vis_cnt, mask=ok)
    if HAS_FAI:
        tl.store(FAI_SUM + out, fai_sum, mask=ok)
        tl.store(FAI_CNT + out, fai_cnt, mask=ok)


KERNELS = {"row": _row_kernel, "col": _col_kernel}


@dataclass
class Launch:
    """One kernel launch but its tile configuration, which the autotuner (CUDA), the interpreter
    (first candidate) or the compile check (every candidate) supplies."""

    kind: Kind
    args: tuple[Any, ...]  # positional runtime arguments
    flags: dict[str, Any]  # constexpr arguments that do not depend on the tile configuration
    length: int  # Tq (row pass) or Tk (column pass): grid axis 0
    kv_programs: int  # B * Hkv
    groups: int  # query heads per KV head
    head_dim: int
    configs: tuple[TileConfig, ...]  # candidates (``launch.candidates``); the first is the default

    @property
    def kernel(self) -> Any:
        return KERNELS[self.kind]

    @property
    def name(self) -> Pass:
        """The pass: ``row``, ``fused`` (the row kernel with P @ V) or ``col``."""
        return "fused" if self.flags.get("HAS_V") else self.kind

    def constexprs(self, cfg: TileConfig) -> dict[str, Any]:
        return {**self.flags, **cfg.constexprs(self.kind, self.groups)}

    def grid(self, meta: dict[str, Any]) -> tuple[int, int]:
        """Programs for the tile sizes in ``meta`` (BLOCK_M, BLOCK_N, GP)."""
        per_tile = meta["BLOCK_M"] // meta["GP"] if self.kind == "row" else meta["BLOCK_N"]
        chunks = triton.cdiv(self.groups, meta["GP"])
        return triton.cdiv(self.length, per_tile), self.kv_programs * chunks

    def run(self) -> None:
        if INTERPRET:  # no autotuning in the interpreter: the fixed configuration
            cfg = self.configs[0]
            const = self.constexprs(cfg)
            self.kernel[self.grid(const)](*self.args, **const)
        else:
            size = size_class(self.length)
            tuned = _autotuned(self.kind, self.configs, self.groups, size, tuple(self.flags))
            tuned[self.grid](*self.args, **self.flags)


@functools.cache
def _autotuned(
    kind: Kind, configs: tuple[TileConfig, ...], groups: int, size: int, flags: tuple[str, ...]
) -> Any:
    """The kernel autotuned over ``configs`` (CUDA only): one tuner per group size and length
    class (``size``, only part of the cache key), choosing per constexpr ``flags`` and dtypes."""
    del size
    tile_configs = [
        triton.Config(c.constexprs(kind, groups), num_warps=c.num_warps, num_stages=c.num_stages)
        for c in configs
    ]
    return triton.autotune(tile_configs, key=list(flags))(KERNELS[kind])


@dataclass
class Plan:
    """The launches of one request and the buffers they fill."""

    launches: list[Launch]
    rows: dict[str, torch.Tensor]
    col_sums: dict[str, torch.Tensor]
    col_counts: dict[str, torch.Tensor]
    lse: torch.Tensor
    out: torch.Tensor | None = None  # [B, Hq, Tq, Dv] attention output (with a value)


def _alloc(*shape: int, device: torch.device) -> torch.Tensor:
    """Output buffers; every element is written by a kernel (tests poison this to check)."""
    return torch.empty(shape, device=device, dtype=torch.float32)


def _mask_words(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask ``[B, 1|Hq, Tq, Tk]`` as int32 words of 32 keys (bit j of word w: key
    32 w + j), so kernels read one word per row and key tile. ``[B, 1|Hq, Tq, ceil(Tk / 32)]``."""
    b, h, tq, tk = mask.shape
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, -tk % 32)).view(b, h, tq, -1, 8)
    weights = 1 << torch.arange(8, device=mask.device, dtype=torch.uint8)
    return (m * weights).sum(-1).to(torch.uint8).view(torch.int32)  # little-endian bytes


def _is_sorted(pos: torch.Tensor) -> bool:
    """Positions [B, T] non-decreasing along T (then index ranges follow from searchsorted)."""
    return pos.shape[1] <= 1 or bool((pos[:, 1:] >= pos[:, :-1]).all())


def _ranges(lo: torch.Tensor, hi: torch.Tensor, in_lo: torch.Tensor, in_hi: torch.Tensor):
    """Stack per-entry ranges [lo, hi) and entirely seen [in_lo, in_hi) as int32 [B, T, 4]."""
    hi = torch.maximum(lo, hi)
    in_hi = torch.minimum(torch.maximum(in_lo, in_hi), hi)
    return torch.stack([lo, hi, torch.minimum(in_lo, in_hi), in_hi], -1).to(torch.int32)


def _key_ranges(req: StatsRequest) -> torch.Tensor:
    """Per query: the keys it may see and the keys it sees all of (no mask needed there).
    int32 [B, Tq, 4]. Unsorted key positions or a full mask: masks decide everywhere."""
    qp, kp = req.q_pos, req.k_pos
    tk = kp.shape[1]
    every = torch.full_like(qp, tk)
    if not _is_sorted(kp):
        return _ranges(torch.zeros_like(qp), every, every, every)
    lo = torch.zeros_like(qp)
    if req.sliding_window is not None:
        lo = torch.searchsorted(kp, qp - req.sliding_window + 1)
    hi = torch.searchsorted(kp, qp, right=True) if req.causal else every
    in_lo = lo
    if req.key_valid is not None:  # entirely seen: after the last padding key below hi
        idx = torch.arange(tk, device=kp.device).expand_as(kp)
        last_pad = torch.where(req.key_valid, -1, idx).cummax(-1).values  # [B, Tk]
        in_lo = torch.maximum(lo, last_pad.gather(1, (hi - 1).clamp_min(0)) + 1)
    return _ranges(lo, hi, in_lo, lo if req.mask is not None else hi)


def _query_ranges(req: StatsRequest) -> torch.Tensor:
    """Per key: the queries that may see it or count for its FAI, and those that see it all
    (no mask needed there). int32 [B, Tk, 4]. Unsorted query positions: masks decide."""
    qp, kp = req.q_pos, req.k_pos
    tq = qp.shape[1]
    every = torch.full_like(kp, tq)
    if not _is_sorted(qp):
        return _ranges(torch.zeros_like(kp), every, every, every)
    lo = torch.searchsorted(qp, kp) if req.causal else torch.zeros_like(kp)
    hi = in_hi = every
    if req.sliding_window is not None:  # later rows beyond the window count for FAI only
        in_hi = torch.searchsorted(qp, kp + req.sliding_window - 1, right=True)
        reach = req.sliding_window - 1
        if req.wants("fai"):
            reach = max(reach, NO_REACH if req.fai_horizon is None else req.fai_horizon[1])
        hi = torch.searchsorted(qp, kp + min(reach, NO_REACH), right=True)
    if req.key_valid is not None:  # padding keys are seen by no query
        in_hi = torch.where(req.key_valid, in_hi, lo)
    return _ranges(lo, hi, lo, lo if req.mask is not None else in_hi)


def plan(req: StatsRequest, value: torch.Tensor | None = None) -> Plan:
    """Buffers and launches of the ``triton`` backend for ``req`` (``triton_stats`` runs them;
    benchmarks/triton_compile.py compiles them for a GPU without one). With ``value``
    ``[B, Hkv, Tk, Dv]`` the row pass also computes the attention output (``Plan.out``)."""
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (req.q, req.k))
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    dev = q.device
    kvalid = req.key_valid if req.key_valid is not None else torch.ones(1, 1, device=dev)
    kvalid = kvalid.to(torch.uint8).contiguous()
    mask = _mask_words(req.mask) if req.mask is not None else torch.zeros(1, 1, 1, 1, device=dev)
    mask_strides = mask.expand(mask.shape[0], hq, *mask.shape[2:]).stride()[:3]
    flags = dict(
        D=d,
        BLOCK_D=block_d(d),
        CAUSAL=req.causal,
        HAS_SLIDING=req.sliding_window is not None,
        HAS_SOFTCAP=req.softcap is not None,
        HAS_KVALID=req.key_valid is not None,
        HAS_MASK=req.mask is not None,
        CAST=INTERPRET,  # the interpreter computes in fp32 (its bf16 tl.dot is wrong)
        PRECISION="ieee" if INTERPRET else "tf32x3" if q.dtype == torch.float32 else "tf32",
    )
    common = (q, k, req.q_pos, req.k_pos, kvalid, mask)
    strides = (*q.stride()[:3], *k.stride()[:3], *mask_strides)
    shape = (hkv, tq, tk, req.groups, req.scale, req.softcap or 1.0, req.sliding_window or 0)

    spans = [(0, req.sink_tokens), *req.spans.values()]
    n_spans = 1 if len(spans) == 1 else 16
    span_lo = torch.tensor([s for s, _ in spans], dtype=torch.int64, device=dev)
    span_hi = torch.tensor([e for _, e in spans], dtype=torch.int64, device=dev)
    ent, dist, waad, maxa, lse = (_alloc(b, hq, tq, device=dev) for _ in range(5))
    span_out = _alloc(b, hq, n_spans, tq, device=dev)
    has_sinks = req.sinks is not None
    sinks = req.sinks.float().contiguous() if has_sinks else lse  # lse: an unread placeholder
    sink_p = _alloc(b, hq, tq, device=dev) if has_sinks else lse
    has_v = value is not None
    if has_v:
        v = value if value.stride(-1) == 1 else value.contiguous()
        out = _alloc(b, hq, tq, v.shape[-1], device=dev)
        v_strides = v.stride()[:3]
    else:  # unread placeholders
        v, out, v_strides = q, lse, (0, 0, 0)
    row_args = (
        *common,
        span_lo,
        span_hi,
        _key_ranges(req).contiguous(),
        sinks,
        ent,
        dist,
        waad,
        maxa,
        span_out,
        sink_p,
        lse,
        v,
        out,
        *strides,
        *v_strides,
        *shape,
        float(req.window),
        len(spans),
        mask.shape[-1],
    )
    dv = v.shape[-1] if has_v else 16
    row_flags = dict(
        flags, NS=n_spans, HAS_SINKS=has_sinks, HAS_V=has_v, DV=dv, BLOCK_DV=block_d(dv)
    )
    # the fused forward's P @ V accumulator grows with Dv (16, the placeholder, selects by d)
    row_configs = candidates("fused" if has_v else "row", max(d, dv), q.dtype, INTERPRET)
    launches = [Launch("row", row_args, row_flags, tq, b * hkv, req.groups, d, row_configs)]
    all_rows = {
        "entropy": ent,
        "mean_distance": dist,
        "waad": waad,
        "max_attention": maxa,
        "sink_mass": span_out[:, :, 0],
        "sink_logit_mass": sink_p,
    }
    for i, name in enumerate(req.spans, start=1):
        all_rows[SPAN_PREFIX + name] = span_out[:, :, i]
    rows = {n: all_rows[n] for n in req.row_metrics}

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    if req.col_metrics:
        fai_lo, fai_hi = (1.0, float("inf")) if req.fai_horizon is None else req.fai_horizon
        rows_lo, rows_hi = req.fai_rows or (-(2**62), 2**62)
        recv, vis_cnt = (_alloc(b, hq, tk, device=dev) for _ in range(2))
        has_fai = req.wants("fai")
        fai_sum, fai_cnt = (_alloc(b, hq, tk, device=dev) if has_fai else recv for _ in range(2))
        col_args = (
            *common,
            lse,
            _query_ranges(req).contiguous(),
            recv,
            fai_sum,
            fai_cnt,
            vis_cnt,
            *strides,
            *shape,
            float(fai_lo),
            float(fai_hi),
            rows_lo,
            rows_hi,
            mask.shape[-1],
        )
        col_flags = dict(flags, HAS_FAI=has_fai)
        col_configs = candidates("col", d, q.dtype, INTERPRET)
        launches.append(Launch("col", col_args, col_flags, tk, b * hkv, req.groups, d, col_configs))
        if req.wants("received"):
            sums["received"] = recv
        if req.wants("sink_score"):
            sums["sink_score"], counts["sink_score"] = recv, vis_cnt
        if has_fai:
            sums["fai"], counts["fai"] = fai_sum, fai_cnt
    return Plan(launches, rows, sums, counts, lse, out if has_v else None)


def triton_stats(req: StatsRequest) -> AttentionStats:
    """The ``triton`` backend of ``attention_stats`` (what it serves: ``kernels.backends``)."""
    return triton_fused(req, None)[0]


def triton_fused(
    req: StatsRequest, value: torch.Tensor | None
) -> tuple[AttentionStats, torch.Tensor | None]:
    """Statistics of ``req`` and, with ``value`` ``[B, Hkv, Tk, Dv]``, the attention output
    ``[B, Hq, Tq, Dv]`` (fp32) from the same row pass (the fused forward on a GPU)."""
    p = plan(req, value)
    for launch in p.launches:
        launch.run()
    rows = {n: t.contiguous() for n, t in p.rows.items()}
    return AttentionStats(rows, p.col_sums, p.col_counts, p.lse, backend="triton"), p.out
