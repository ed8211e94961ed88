"""Dense reference metrics on attention probabilities (METRICS.md). The oracle for every fast path.

All functions take ``attn`` of shape ``[..., Tq, Tk]`` (rows sum to 1 over visible keys, masked keys
are exactly 0, fully masked rows are NaN; with learned sinks, as in gpt-oss, rows sum to 1 minus the
sink's probability, and ``entropy`` takes that probability to add its term) and optional absolute
positions:
``q_pos`` ``[..., Tq]`` and ``k_pos`` ``[..., Tk]`` (default: keys 0..Tk-1, queries aligned to the end
of the keys, as in a causal prefill). Distances are ``q_pos - k_pos``. Outputs keep the input's
precision: float64 in, float64 out; half precision and float32 give float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

WAAD_WINDOW = 10
FAI_HORIZON = (10, 100)
SINK_EPS = 0.3  # a head is a sink head when its first token's sink score exceeds this
HEAD_GROUP_FRACTION = 0.3  # bottom / top share of heads by head span: local / global heads


def positions(attn: Tensor, q_pos: Tensor | None, k_pos: Tensor | None) -> tuple[Tensor, Tensor]:
    """Default positions: keys 0..Tk-1, queries end-aligned. Returns ``[..., Tq], [..., Tk]`` int64."""
    tq, tk = attn.shape[-2], attn.shape[-1]
    if k_pos is None:
        k_pos = torch.arange(tk, device=attn.device)
    if q_pos is None:
        q_pos = torch.arange(tk - tq, tk, device=attn.device)
    return q_pos.long(), k_pos.long()


def _real(attn: Tensor) -> Tensor:
    """``attn`` in the precision the metrics compute in: at least float32, float64 kept."""
    return attn.to(torch.promote_types(attn.dtype, torch.float32))


def _distance(attn: Tensor, q_pos: Tensor | None, k_pos: Tensor | None) -> Tensor:
    q, k = positions(attn, q_pos, k_pos)
    dtype = torch.promote_types(attn.dtype, torch.float32)
    return (q[..., :, None] - k[..., None, :]).to(dtype)  # [..., Tq, Tk]


def entropy(attn: Tensor, sink: Tensor | None = None) -> Tensor:
    """Shannon entropy of each query row (natural log, 0 log 0 = 0). ``[..., Tq]``.

    ``sink`` ``[..., Tq]``: the probability of a learned sink (a virtual key outside ``attn``,
    whose rows then sum to ``1 - sink``); the entropy is that of the whole distribution, keys and
    sink: ``-sum_s A[t,s] log A[t,s] - sink_t log sink_t``.
    """
    a = _real(attn)
    plogp = torch.where(a > 0, a * torch.log(torch.where(a > 0, a, 1.0)), 0.0).sum(-1)
    if sink is not None:
        p_sink = sink.to(a.dtype)
        plogp = plogp + torch.special.xlogy(p_sink, p_sink)
    return torch.where(_valid_rows(a), -plogp, float("nan"))


def mean_distance(attn: Tensor, q_pos: Tensor | None = None, k_pos: Tensor | None = None) -> Tensor:
    """Expected attention distance ``sum_s A[t,s] |t - s|`` (the look-back distance for causal
    attention, symmetric for bidirectional). ``[..., Tq]``."""
    return (_real(attn) * _distance(attn, q_pos, k_pos).abs()).sum(-1)


def waad(
    attn: Tensor,
    window: int = WAAD_WINDOW,
    q_pos: Tensor | None = None,
    k_pos: Tensor | None = None,
) -> Tensor:
    """Windowed average attention distance ``sum_s A[t,s] min(|t - s|, W)``, in [0, W]. ``[..., Tq]``."""
    if window < 1:
        raise ValueError(f"waad window must be >= 1, got {window}")
    dist = _distance(attn, q_pos, k_pos).abs().clamp(max=window)
    return (_real(attn) * dist).sum(-1)


def max_attention(attn: Tensor) -> Tensor:
    """Largest probability of each row. ``[..., Tq]``."""
    return _real(attn).amax(-1)


def sink_mass(attn: Tensor, k: int = 1, k_pos: Tensor | None = None) -> Tensor:
    """Attention mass on the first ``k`` tokens (positions < k). ``[..., Tq]``."""
    _, kp = positions(attn, None, k_pos)
    a = _real(attn)
    return (a * ((kp >= 0) & (kp < k)).to(a.dtype)[..., None, :]).sum(-1)


def span_mass(attn: Tensor, start: int, end: int, k_pos: Tensor | None = None) -> Tensor:
    """Attention mass on key positions in ``[start, end)``. ``[..., Tq]``."""
    _, kp = positions(attn, None, k_pos)
    a = _real(attn)
    return (a * ((kp >= start) & (kp < end)).to(a.dtype)[..., None, :]).sum(-1)


def _valid_rows(attn: Tensor) -> Tensor:
    """Rows that hold a distribution (not NaN, fully masked pad rows). ``[..., Tq]`` bool."""
    return ~torch.isnan(attn).any(-1)


def check_horizon(horizon: tuple[int, int] | None) -> None:
    if horizon is not None and not (0 <= horizon[0] <= horizon[1]):
        raise ValueError(f"fai horizon must satisfy 0 <= lo <= hi, got {horizon}")


def fai_selection(dist: Tensor, horizon: tuple[int, int] | None) -> Tensor:
    """Which (row, key) pairs count for FAI: ``lo <= t - s <= hi`` (or ``t > s`` without horizon)."""
    check_horizon(horizon)
    if horizon is None:
        return dist >= 1
    return (dist >= horizon[0]) & (dist <= horizon[1])


def analysed_rows(valid: Tensor, q_pos: Tensor, rows: tuple[int, int] | None) -> Tensor:
    """Valid rows whose position lies in ``rows=(start, end)`` (all valid rows if None)."""
    if rows is None:
        return valid
    return valid & (q_pos >= rows[0]) & (q_pos < rows[1])


def received(attn: Tensor) -> Tensor:
    """Total attention each key receives from valid rows. ``[..., Tk]``."""
    return torch.nan_to_num(_real(attn)).sum(-2)


def fai(
    attn: Tensor,
    horizon: tuple[int, int] | None = FAI_HORIZON,
    rows: tuple[int, int] | None = None,
    q_pos: Tensor | None = None,
    k_pos: Tensor | None = None,
) -> Tensor:
    """Future attention influence: mean of ``A[t,s]`` over rows ``t`` with ``s+lo <= t <= s+hi``.

    ``horizon=None`` means all ``t > s``. ``rows=(start, end)`` restricts ``t`` to query positions in
    ``[start, end)`` (e.g. the response). NaN where no row qualifies. ``[..., Tk]``.
    """
    q, k = positions(attn, q_pos, k_pos)
    sel = fai_selection(q[..., :, None] - k[..., None, :], horizon)  # [..., Tq, Tk]
    sel = sel & analysed_rows(_valid_rows(attn), q, rows)[..., :, None]
    total = (torch.nan_to_num(_real(attn)) * sel).sum(-2)
    count = sel.sum(-2).to(total.dtype)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def sink_score(
    attn: Tensor,
    mask: Tensor | None = None,
    q_pos: Tensor | None = None,
    k_pos: Tensor | None = None,
) -> Tensor:
    """Mean attention a key receives from the queries that can see it (``alpha_s``). ``[..., Tk]``.

    ``mask`` (bool ``[..., Tq, Tk]``, True = visible) defines "can see"; by default a query sees
    every key at or before its position.
    """
    if mask is None:
        q, k = positions(attn, q_pos, k_pos)
        mask = q[..., :, None] >= k[..., None, :]
    visible = mask & _valid_rows(attn)[..., :, None]
    total = (torch.nan_to_num(_real(attn)) * visible).sum(-2)
    count = visible.sum(-2).to(total.dtype)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def head_span(
    attn: Tensor,
    rows: tuple[int, int] | None = None,
    q_pos: Tensor | None = None,
    k_pos: Tensor | None = None,
) -> Tensor:
    """Mean look-back distance of a head over the analysed rows. ``[...]`` (drops Tq, Tk)."""
    d = mean_distance(attn, q_pos, k_pos)  # [..., Tq]
    q, _ = positions(attn, q_pos, k_pos)
    ok = analysed_rows(_valid_rows(attn), q, rows)
    return (torch.where(ok, d, 0.0).sum(-1)) / ok.sum(-1).clamp_min(1)


def head_groups(span: Tensor, fraction: float = HEAD_GROUP_FRACTION) -> dict[str, Tensor]:
    """Split heads by head span: bottom ``fraction`` local, top ``fraction`` global.

    ``span``: ``[n_layers, n_heads]``. Returns bool masks of the same shape under "local" / "global".
    """
    if not 0 < fraction <= 0.5:
        raise ValueError(f"head group fraction must be in (0, 0.5], got {fraction}")
    flat = span.flatten()
    n = max(1, round(fraction * flat.numel()))
    order = torch.argsort(flat, stable=True)
    local = torch.zeros_like(flat, dtype=torch.bool)
    glob = torch.zeros_like(flat, dtype=torch.bool)
    local[order[:n]] = True
    glob[order[-n:]] = True
    return {"local": local.view_as(span), "global": glob.view_as(span)}


def sink_heads(alpha0: Tensor, eps: float = SINK_EPS) -> Tensor:
    """Heads whose first-token sink score exceeds ``eps``. Same shape as ``alpha0``."""
    return alpha0 > eps
