"""Head-detector metrics from single attention weights, after any backend (KERNELS.md).

Any one weight is exact from its row's log-normaliser: ``A[t, s] = exp(score(t, s) - lse_t)``,
with the call's scale, softcap, score bias, masks and learned sinks (``lse`` includes the sink).
Each metric looks up a few keys per query row: the previous token, the earlier copies of the
row's token (duplicate-token), the tokens after them (induction), the copies of the row's next
token (``copy_attention``). The work is O(pairs x D) per head, a sampled matrix product at the
looked-up (row, key) couples the positions allow: T for the previous token, sum over token types
of c^2 / 2 for copies (c occurrences; far fewer within a sliding window).
``lookback`` is a ratio of the backend's span mass on the context to the rest of the row.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import Tensor

from attnscope.errors import ShapeError
from attnscope.kernels.request import StatsRequest
from attnscope.kernels.stats import AttentionStats
from attnscope.kernels.table import (
    CONTEXT_SPAN,
    HEAD_METRICS,
    SOURCE_SPAN,
    SPAN_PREFIX,
    TOKEN_METRICS,
)

CONTEXT_MASS = SPAN_PREFIX + CONTEXT_SPAN
# query rows looked up together: bounds the couples held at once (a long text that repeats itself
# has O(T^2) earlier copies in all; 1024 rows of a 32K text with 800 copies per token: 0.4M)
LOOKUP_ROWS = 1024


def backend_request(req: StatsRequest) -> StatsRequest:
    """``req`` without the head metrics, plus the context's span mass that ``lookback`` reads."""
    if not any(m in HEAD_METRICS for m in req.metrics):
        return req
    metrics = [m for m in req.metrics if m not in HEAD_METRICS]
    if "lookback" in req.metrics and CONTEXT_MASS not in metrics:
        metrics.append(CONTEXT_MASS)
    return replace(req, metrics=tuple(metrics))


def add_head_rows(
    req: StatsRequest, inner: StatsRequest, stats: AttentionStats, tokens: Tensor | None
) -> None:
    """Complete ``stats``, which a backend computed for ``inner = backend_request(req)``: add
    the head metrics from its log-normaliser and keep ``req``'s rows in their order."""
    if inner is req:
        return
    stats.rows.update(lookup_rows(req, stats.lse, tokens))
    if req.wants("lookback"):
        stats.rows["lookback"] = lookback(req, stats.rows, stats.lse)
    stats.rows = {m: stats.rows[m] for m in req.row_metrics}


def lookup_rows(req: StatsRequest, lse: Tensor, tokens: Tensor | None) -> dict[str, Tensor]:
    """Head metrics of ``req`` except ``lookback``, each ``[B, Hq, Tq]`` in ``lse``'s dtype.

    ``lse`` ``[B, Hq, Tq]``: the backend's log-normaliser (sink included). ``tokens`` ``[B, N]``:
    the token id at each position (``req.q_pos`` / ``req.k_pos`` index it; negative = unknown),
    needed for duplicate_token, induction and copy_attention. Rows that see no key are NaN."""
    wanted = [m for m in req.metrics if m in HEAD_METRICS and m != "lookback"]
    if not wanted:
        return {}
    need = [m for m in wanted if m in TOKEN_METRICS]
    if need and tokens is None:
        raise ShapeError(
            f"{need} need the token ids of the sequence: pass tokens=[B, N] (ids by position) to "
            "attention_stats; capture() passes the model's input_ids"
        )
    if tokens is not None and (tokens.dim() != 2 or tokens.shape[0] != req.q.shape[0]):
        raise ShapeError(f"tokens must be [B, N] token ids, got {tuple(tokens.shape)}")
    valid = torch.isfinite(lse)  # [B, Hq, Tq]
    out = {}
    for name in wanted:
        reduce = "amax" if name == "copy_attention" else "sum"
        values = torch.stack(
            [_row_values(req, lse, tokens, b, name, reduce) for b in range(req.q.shape[0])]
        )
        out[name] = torch.where(valid, values, float("nan"))
    return out


def lookback(req: StatsRequest, rows: dict[str, Tensor], lse: Tensor) -> Tensor:
    """Lookback ratio ``[B, Hq, Tq]`` (Chuang et al. 2024) of rows ``t >= N`` from the backend's
    mass on the context ``[0, N)`` (``rows`` holds ``span_mass:context``): mean weight on the
    context over (that + mean weight on the new tokens ``[N, t]``); NaN before ``N``."""
    n = req.spans[CONTEXT_SPAN][1]
    context = rows[CONTEXT_MASS]  # [B, Hq, Tq]
    total = torch.ones_like(context)
    if req.sinks is not None:  # the row's weights over keys sum to 1 - the sink's
        total = 1 - req.sink_probability(lse)
    new_tokens = (req.q_pos[:, None, :] - n + 1).to(context.dtype)  # [B, 1, Tq] keys in [N, t]
    ctx_mean = context / max(n, 1)
    new_mean = (total - context).clamp_min(0) / new_tokens.clamp_min(1)
    ratio = ctx_mean / (ctx_mean + new_mean)
    return torch.where(new_tokens > 0, ratio, float("nan"))


def _row_values(
    req: StatsRequest, lse: Tensor, tokens: Tensor | None, b: int, name: str, reduce: str
) -> Tensor:
    """One sequence: the metric's sum (or max) of looked-up weights per row ``[Hq, Tq]``,
    ``LOOKUP_ROWS`` rows at a time."""
    hq, tq = req.q.shape[1], req.q.shape[2]
    toks = tokens[b].to(req.q.device) if tokens is not None else None
    source = req.spans.get(SOURCE_SPAN) if name == "copy_attention" else None
    # a sum needs only the copies inside a sliding window; a max tells "none visible" (0) from
    # "no copy" (NaN), so it enumerates them all
    window = req.sliding_window if reduce == "sum" else None
    fill = float("-inf") if reduce == "amax" else 0.0
    out = torch.full((hq, tq), fill, dtype=lse.dtype, device=lse.device)
    candidate = torch.zeros(tq, dtype=torch.bool, device=req.q.device)
    for first in range(0, tq, LOOKUP_ROWS):
        chunk = req.q_pos[b, first : first + LOOKUP_ROWS]
        rows, key_pos = pairs(name, chunk, toks, source, window)  # [P], [P]
        rows = rows + first
        candidate[rows] = True  # rows with a key to look up (weight 0 if the row cannot see it)
        slot = _slots(req.k_pos[b], key_pos)  # [P] key index or -1
        keep = (slot >= 0) & _visible(req, b, rows, slot.clamp_min(0))
        rows, slot = rows[keep], slot[keep]
        order = torch.argsort(rows * req.k.shape[2] + slot)  # by row, then key (CSR order)
        rows, slot = rows[order], slot[order]
        if len(rows):
            w = pair_weights(req, lse, b, rows, slot)  # [Hq, P]
            out.scatter_reduce_(1, rows[None].expand_as(w), w, reduce=reduce, include_self=True)
    if reduce == "amax":  # every candidate out of sight: 0; no candidate at all: NaN
        out = torch.where(torch.isinf(out), 0.0, out).where(candidate, float("nan"))
    return out


def _visible(req: StatsRequest, b: int, rows: Tensor, keys: Tensor) -> Tensor:
    """Which (row, key) couples the positions allow: causal, sliding window, key padding
    (``[P]`` bool; a full mask is applied per head in ``pair_weights``)."""
    qp, kp = req.q_pos[b, rows], req.k_pos[b, keys]  # [P]
    ok = (kp >= 0) & req.by_position(qp, kp)
    if req.key_valid is not None:
        ok = ok & req.key_valid[b, keys]
    return ok


def pairs(
    name: str,
    q_pos: Tensor,
    tokens: Tensor | None,
    source: tuple[int, int] | None = None,
    window: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Looked-up (query row, key position) couples of a metric for queries at ``q_pos`` ``[Tq]``;
    ``tokens`` ``[N]`` by position. Returns rows ``[P]`` (indices into ``q_pos``) and key
    positions ``[P]``: prev_token t-1; duplicate_token s < t with x_s = x_t; induction s in
    [1, t] with x_{s-1} = x_t; copy_attention s <= t with x_s = x_{t+1} (within ``source``).
    ``window``: only keys a sliding window of that size lets row t see (s > t - window)."""
    rows = torch.arange(len(q_pos), device=q_pos.device)
    if name == "prev_token":
        keep = q_pos >= 1
        return rows[keep], q_pos[keep] - 1
    assert tokens is not None
    n = len(tokens)
    lo, hi = (0, n) if source is None else (max(0, source[0]), min(n, source[1]))
    if name == "copy_attention":  # the next token, up to and including the row
        target, bound, shift = _token_at(tokens, q_pos + 1), q_pos + 1, 0
    elif name == "duplicate_token":
        target, bound, shift = _token_at(tokens, q_pos), q_pos, 0
    elif name == "induction":  # s - 1 = u < t with x_u = x_t, key s = u + 1
        target, bound, shift = _token_at(tokens, q_pos), q_pos, 1
    else:
        raise ValueError(f"{name!r} is not a lookup metric")
    low = None if window is None else q_pos - window + 1 - shift  # key u + shift > t - window
    return _earlier_matches(tokens, lo, hi, rows, target, bound, shift, low)


def _earlier_matches(
    tokens: Tensor,
    lo: int,
    hi: int,
    rows: Tensor,
    target: Tensor,
    bound: Tensor,
    shift: int,
    low: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """For each row, the positions ``u`` in ``[max(lo, low), min(hi, bound))`` with
    ``tokens[u] == target`` (target < 0: none), as (row, u + shift) couples ordered by row.
    O(N log N + P)."""
    pos = torch.arange(lo, hi, device=tokens.device)
    tok = tokens[lo:hi]
    known = tok >= 0
    pos, tok = pos[known], tok[known]
    m = len(tokens) + 1
    code, order = torch.sort(tok * m + pos)  # by token, then position
    pos = pos[order]
    ok = target >= 0
    rows, target, bound = rows[ok], target[ok], bound[ok].clamp(max=hi)
    earliest = torch.zeros_like(bound) if low is None else low[ok].clamp(0, len(tokens))
    start = torch.searchsorted(code, target * m + earliest)
    stop = torch.searchsorted(code, target * m + bound.clamp_min(0))
    count = (stop - start).clamp_min(0)  # [R]
    total = int(count.sum())
    row = torch.repeat_interleave(rows, count)  # [P]
    first = torch.repeat_interleave(start, count)
    offset = torch.arange(total, device=tokens.device) - torch.repeat_interleave(
        count.cumsum(0) - count, count
    )
    return row, pos[first + offset] + shift


def _token_at(tokens: Tensor, positions: Tensor) -> Tensor:
    """Token ids at ``positions`` ``[R]``; -1 outside ``[0, N)``."""
    inside = (positions >= 0) & (positions < len(tokens))
    return torch.where(inside, tokens[positions.clamp(0, len(tokens) - 1)], -1)


def _slots(k_pos: Tensor, key_pos: Tensor) -> Tensor:
    """Index of the key at each position of ``key_pos`` ``[P]`` in ``k_pos`` ``[Tk]``; -1 when
    the call holds no such key (evicted from a sliding cache, padding)."""
    size = int(max(k_pos.max(), key_pos.max() if len(key_pos) else 0)) + 1
    slot_of = torch.full((size,), -1, dtype=torch.long, device=k_pos.device)
    real = k_pos >= 0
    slot_of[k_pos[real]] = torch.arange(len(k_pos), device=k_pos.device)[real]
    return slot_of[key_pos.clamp_min(0)].where(key_pos >= 0, -1)


def pair_weights(req: StatsRequest, lse: Tensor, b: int, rows: Tensor, keys: Tensor) -> Tensor:
    """``A[b, h, rows[p], keys[p]]`` for every query head ``[Hq, P]`` (visible couples sorted
    by row, then key, each once): the score with the call's scale, softcap and bias, minus the
    row's log-normaliser; 0 where a full mask blocks the key. The scores are a sampled matrix
    product (SDDMM) at the couples only: no per-couple copy of the queries."""
    s = _sampled_scores(req, b, rows, keys, lse.dtype)  # [Hq, P]
    if req.softcap is not None:
        s = torch.tanh(s / req.softcap) * req.softcap
    if req.bias is not None:
        s = s + req.bias[b][:, rows, keys].to(s.dtype)  # [1|Hq, P]
    norm = lse[b][:, rows]  # [Hq, P]
    ok = torch.isfinite(norm)
    if req.mask is not None:
        ok = ok & req.mask[b][:, rows, keys]  # [1|Hq, P]
    return torch.where(ok, torch.exp(s - torch.where(ok, norm, 0.0)), 0.0)


def _sampled_scores(req: StatsRequest, b: int, rows: Tensor, keys: Tensor, dtype) -> Tensor:
    """``q_h[rows[p]] . k_h[keys[p]] * scale`` ``[Hq, P]`` for couples sorted by (row, key)."""
    tq, tk = req.q.shape[2], req.k.shape[2]
    crow = torch.zeros(tq + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=tq).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow,
            keys,
            torch.zeros(len(keys), dtype=dtype, device=rows.device),
            (tq, tk),
            check_invariants=False,
        )
        q = req.q[b].to(dtype)  # [Hq, Tq, D]
        k = req.k[b].to(dtype)  # [Hkv, Tk, D]
        s = [
            torch.sparse.sampled_addmm(pattern, q[h], k[h // req.groups].T, beta=0.0).values()
            for h in range(q.shape[0])
        ]
    return torch.stack(s) * req.scale
