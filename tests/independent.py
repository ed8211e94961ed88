"""An independent float64 reference for ``attention_stats``, written from METRICS.md.

It imports nothing from attnscope, so a bug in the code the backends share (masking, scoring,
positions, FAI row selection) cannot hide in it. Every statistic is computed from its definition
on explicit float64 probabilities; clarity over speed (small inputs only).

Conventions (as ``attention_stats``): positions default to keys ``0..Tk-1`` (with key padding:
the number of real keys up to and including each key, minus 1) and queries aligned to the end of
the keys (``0..Tq-1`` when ``Tq > Tk``). A query sees a key when every constraint holds: causal
``k_pos <= q_pos``, sliding window ``q_pos - k_pos < W``, the key is not padding, the mask allows
it. A row that sees no key is fully masked: NaN row statistics, lse -inf, no column contribution.
Learned sinks (gpt-oss): a virtual key per head with logit ``sinks[h]`` joins every row's
softmax but is never a position; the row's probabilities over real keys sum to 1 - its share,
entropy counts it, lse includes it, and ``sink_logit_mass`` is its probability.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class Reference(NamedTuple):
    rows: dict[str, Tensor]  # name -> [B, Hq, Tq] float64
    cols: dict[str, Tensor]  # name -> [B, Hq, Tk] float64
    lse: Tensor  # [B, Hq, Tq] float64, -inf for fully masked rows


def default_positions(b: int, tq: int, tk: int, key_valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """Positions ``[B, Tq]`` and ``[B, Tk]`` (int64) when none are given."""
    if key_valid is None:
        k_pos = torch.arange(tk).expand(b, tk).clone()
    else:
        k_pos = torch.zeros(b, tk, dtype=torch.int64)
        for i in range(b):
            real = -1
            for s in range(tk):
                real += int(bool(key_valid[i, s]))
                k_pos[i, s] = real
    q_pos = k_pos[:, tk - tq :] if tq <= tk else torch.arange(tq).expand(b, tq)
    return q_pos.clone(), k_pos


def reference_stats(
    q: Tensor,
    k: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int = 10,
    fai_horizon: tuple[int, int] | None = (10, 100),
    fai_rows: tuple[int, int] | None = None,
    sink_tokens: int = 1,
    spans: dict[str, tuple[int, int]] | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    key_valid: Tensor | None = None,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    q_pos: Tensor | None = None,
    k_pos: Tensor | None = None,
    sinks: Tensor | None = None,
) -> Reference:
    """Row and column statistics of ``softmax(q k^T * scale)`` in float64, from the definitions.

    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]`` (query head h uses kv head ``h // (Hq // Hkv)``),
    key_valid bool ``[B, Tk]``, mask bool ``[B, 1|Hq, Tq, Tk]`` (True = attend), bias float
    ``[B, 1|Hq, Tq, Tk]`` added to the (soft-capped) scores, q_pos ``[B, Tq]``, k_pos ``[B, Tk]``,
    sinks ``[Hq]`` learned sink logits.
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1 / math.sqrt(d) if scale is None else scale
    spans = spans or {}
    dq, dk = default_positions(b, tq, tk, key_valid)
    qp = dq if q_pos is None else torch.as_tensor(q_pos).long().expand(b, tq)
    kp = dk if k_pos is None else torch.as_tensor(k_pos).long().expand(b, tk)
    q64, k64 = q.double(), k.double()

    # scores [B, Hq, Tq, Tk]
    kv = torch.stack([k64[:, h // group] for h in range(hq)], 1)  # [B, Hq, Tk, D]
    s = torch.einsum("bhtd,bhsd->bhts", q64, kv) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias.double().expand(b, hq, tq, tk)

    # visibility [B, Hq, Tq, Tk]
    dist = (qp[:, :, None] - kp[:, None, :]).double()  # [B, Tq, Tk], q_pos - k_pos
    vis = torch.ones(b, hq, tq, tk, dtype=torch.bool)
    if causal:
        vis &= (kp[:, None, :] <= qp[:, :, None])[:, None]
    if sliding_window is not None:
        vis &= (dist < sliding_window)[:, None]
    if key_valid is not None:
        vis &= key_valid.bool()[:, None, None, :]
    if mask is not None:
        vis &= mask.bool().expand(b, hq, tq, tk)

    # softmax over visible keys and the sink (if any); fully masked rows NaN, lse -inf
    nan = float("nan")
    p = torch.full((b, hq, tq, tk), nan, dtype=torch.float64)
    p_sink = torch.full((b, hq, tq), nan, dtype=torch.float64)
    lse = torch.full((b, hq, tq), -math.inf, dtype=torch.float64)
    for i in range(b):
        for h in range(hq):
            sink = None if sinks is None else float(sinks[h])
            for t in range(tq):
                seen = vis[i, h, t]
                if not seen.any():
                    continue
                m = float(s[i, h, t][seen].max())
                if sink is not None:
                    m = max(m, sink)
                e = torch.where(seen, torch.exp(s[i, h, t] - m), 0.0)
                e_sink = 0.0 if sink is None else math.exp(sink - m)
                z = e.sum() + e_sink
                p[i, h, t] = e / z
                p_sink[i, h, t] = e_sink / z
                lse[i, h, t] = m + math.log(z)
    valid = ~torch.isnan(p).any(-1)  # [B, Hq, Tq]
    a = torch.nan_to_num(p)  # fully masked rows as zeros, for the column sums

    def row_mass(weight: Tensor) -> Tensor:  # sum_s A[t,s] weight[t,s]; weight [B, Tq|1, Tk]
        return torch.where(valid, (a * weight[:, None]).sum(-1), nan)

    def in_range(lo: int, hi: int) -> Tensor:  # keys with positions in [lo, hi); [B, 1, Tk]
        return ((kp >= lo) & (kp < hi)).double()[:, None]

    plogp = torch.where(a > 0, a * torch.log(torch.where(a > 0, a, 1.0)), 0.0).sum(-1)
    sink_plogp = torch.where(p_sink > 0, p_sink * torch.log(p_sink), 0.0)  # NaN rows: 0
    rows = {
        "entropy": torch.where(valid, -(plogp + sink_plogp), nan),
        "mean_distance": row_mass(dist.abs()),
        "waad": row_mass(dist.abs().clamp(max=window)),
        "sink_mass": row_mass(in_range(0, sink_tokens)),
        "max_attention": torch.where(valid, a.amax(-1), nan),
    }
    if sinks is not None:
        rows["sink_logit_mass"] = p_sink
    for name, (start, end) in spans.items():
        rows[f"span_mass:{name}"] = row_mass(in_range(start, end))

    # columns: received, fai, sink_score
    lo, hi = (1, math.inf) if fai_horizon is None else fai_horizon
    in_rows = torch.ones(b, tq, dtype=torch.bool)
    if fai_rows is not None:
        in_rows = (qp >= fai_rows[0]) & (qp < fai_rows[1])
    fai_sel = (dist >= lo) & (dist <= hi) & in_rows[:, :, None]  # [B, Tq, Tk], positions only
    fai_sel = fai_sel[:, None] & valid[..., None]  # [B, Hq, Tq, Tk]
    sink_sel = vis & valid[..., None]  # valid rows that can see the key
    cols = {
        "received": a.sum(-2),
        "fai": _mean_over_rows(a, fai_sel),
        "sink_score": _mean_over_rows(a, sink_sel),
    }
    return Reference(rows, cols, lse)


def _mean_over_rows(a: Tensor, sel: Tensor) -> Tensor:
    """Mean of ``a`` ``[B, H, Tq, Tk]`` over the rows ``sel`` picks, per key; NaN where none."""
    n = sel.sum(-2).double()
    total = torch.where(sel, a, 0.0).sum(-2)
    return torch.where(n > 0, total / n.clamp_min(1), float("nan"))


def reference_output(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    key_valid: Tensor | None = None,
    sinks: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """The attention output ``softmax(q k^T / sqrt(D)) v`` in float64 from the definition, on
    q's device; q ``[B, Hq, T, D]``, k and v ``[B, Hkv, T, D|Dv]``, key_valid ``[B, T]``
    (left padding), mask bool ``[B, 1|Hq, T, T]`` (True = attend). Rows that see no key: 0.
    ``[B, Hq, T, Dv]``."""
    b, hq, tq, d = q.shape
    group = hq // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(d)  # [B, Hq, Tq, Tk]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    pos = torch.arange(s.shape[-1], device=s.device)
    seen = torch.ones_like(s, dtype=torch.bool)
    if key_valid is not None:  # left padding: positions count real keys only
        pos = key_valid.long().cumsum(-1)[:, None, :] - 1  # [B, 1, Tk]
        seen &= key_valid[:, None, None, :]
    qp, kp = pos[..., :, None], pos[..., None, :]
    if causal:
        seen &= kp <= qp
    if sliding_window is not None:
        seen &= qp - kp < sliding_window
    if mask is not None:
        seen &= mask.bool()
    s = s.masked_fill(~seen, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.double()[None, :, None, None].expand(b, hq, tq, 1)], -1)
    p = torch.softmax(s, -1).nan_to_num()[..., : vv.shape[2]]
    return p @ vv
