"""An independent float64 reference for the head metrics, written from docs/METRICS.md.

It imports nothing from attnscope: every metric loops over the explicit attention matrix
``A [B, H, T, T]`` (queries and keys at positions ``0..T-1``) and the token ids.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def probabilities(
    q: Tensor,
    k: Tensor,
    *,
    softcap: float | None = None,
    sliding_window: int | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Causal ``softmax(q k^T / sqrt(D))`` in float64 ``[B, Hq, T, T]`` (GQA: head h reads kv head
    ``h // (Hq // Hkv)``); a learned sink takes its share of each row without being a key."""
    b, hq, t, d = q.shape
    group = hq // k.shape[1]
    a = torch.zeros(b, hq, t, t, dtype=torch.float64)
    for i in range(b):
        for h in range(hq):
            for r in range(t):
                logits = []
                for s in range(t):
                    seen = s <= r and (sliding_window is None or r - s < sliding_window)
                    x = float(q[i, h, r].double() @ k[i, h // group, s].double()) / math.sqrt(d)
                    if softcap is not None:
                        x = math.tanh(x / softcap) * softcap
                    logits.append(x if seen else -math.inf)
                extra = [] if sinks is None else [float(sinks[h])]
                z = math.fsum(math.exp(x) for x in logits + extra)
                a[i, h, r] = torch.tensor([math.exp(x) / z for x in logits], dtype=torch.float64)
    return a


def head_rows(a: Tensor, tokens: Tensor, source: tuple[int, int] | None = None) -> dict:
    """prev_token, duplicate_token, induction, copy_attention ``[B, H, T]`` from ``A`` and
    ``tokens`` ``[B, T]``, by their definitions."""
    b, h, t, _ = a.shape
    out = {
        n: torch.zeros(b, h, t, dtype=torch.float64)
        for n in ("prev_token", "duplicate_token", "induction")
    }
    out["copy_attention"] = torch.full((b, h, t), math.nan, dtype=torch.float64)
    lo, hi = source if source is not None else (0, t)
    for i in range(b):
        x = tokens[i].tolist()
        for r in range(t):
            for s in range(r + 1):
                w = a[i, :, r, s].double()
                if s == r - 1:
                    out["prev_token"][i, :, r] += w
                if s < r and x[s] == x[r]:
                    out["duplicate_token"][i, :, r] += w
                if s >= 1 and x[s - 1] == x[r]:
                    out["induction"][i, :, r] += w
                if r + 1 < t and x[s] == x[r + 1] and lo <= s < hi:
                    cur = out["copy_attention"][i, :, r]
                    out["copy_attention"][i, :, r] = torch.where(
                        cur.isnan(), w, torch.maximum(cur, w)
                    )
    return out


def lookback_rows(a: Tensor, n: int) -> Tensor:
    """Lookback ratio ``[B, H, T]``: mean weight on keys ``< n`` over (that + mean weight on keys
    ``n..t``) for rows ``t >= n``; NaN before."""
    b, h, t, _ = a.shape
    out = torch.full((b, h, t), math.nan, dtype=torch.float64)
    for r in range(n, t):
        ctx = a[:, :, r, :n].double().sum(-1) / n
        new = a[:, :, r, n : r + 1].double().sum(-1) / (r + 1 - n)
        out[:, :, r] = ctx / (ctx + new)
    return out


def tl_scores(a: Tensor, tokens: list[int]) -> dict[str, tuple[float, float]]:
    """TransformerLens' detect_head ("mul", "abs") of one head's pattern ``A [T, T]``, written
    from its definition: detection patterns P as 0/1 matrices."""
    t = len(tokens)
    prev = torch.zeros(t, t, dtype=torch.float64)
    dup = torch.zeros(t, t, dtype=torch.float64)
    for r in range(t):
        for s in range(r):
            prev[r, s] = float(s == r - 1)
            dup[r, s] = float(tokens[s] == tokens[r])
    ind = torch.zeros(t, t, dtype=torch.float64)
    ind[:, 1:] = dup[:, :-1]
    ind = ind.tril()
    a = a.double()
    return {
        name: (float((a * p).sum() / a.sum()), float(1 - (a - p).abs().sum() / t))
        for name, p in (("prev_token", prev), ("duplicate_token", dup), ("induction", ind))
    }
