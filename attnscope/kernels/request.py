"""Validated inputs of ``attention_stats`` and the pieces every backend shares (positions, masks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnscope.errors import ShapeError, UnsupportedMetricError
from attnscope.metrics.dense import FAI_HORIZON, WAAD_WINDOW, check_horizon

ROW_METRICS = ("entropy", "mean_distance", "waad", "sink_mass", "max_attention")
COL_METRICS = ("received", "fai", "sink_score")
SPAN_PREFIX = "span_mass:"


@dataclass
class StatsRequest:
    """Everything a backend needs, checked and normalised (positions always ``[B, T]`` int64)."""

    q: Tensor  # [B, Hq, Tq, D], any float dtype (backends accumulate in fp32)
    k: Tensor  # [B, Hkv, Tk, D]
    q_pos: Tensor  # [B, Tq] absolute positions in the un-padded sequence
    k_pos: Tensor  # [B, Tk]
    mask: Tensor | None  # bool [B, 1|Hq, Tq, Tk] True = attend, or None
    bias: Tensor | None  # float [B, 1|Hq, Tq, Tk] added to the scores (a float mask's finite part)
    key_valid: Tensor | None  # bool [B, Tk] False = padding key, or None
    causal: bool
    scale: float
    window: int
    fai_horizon: tuple[int, int] | None
    fai_rows: tuple[int, int] | None
    sink_tokens: int
    spans: dict[str, tuple[int, int]]
    sliding_window: int | None
    softcap: float | None
    metrics: tuple[str, ...]
    extra: dict = field(default_factory=dict)

    @property
    def groups(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    def wants(self, name: str) -> bool:
        return name in self.metrics

    @property
    def row_metrics(self) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if m in ROW_METRICS or m.startswith(SPAN_PREFIX))

    @property
    def col_metrics(self) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if m in COL_METRICS)

    def allowed(self, rows: slice, keys: slice = slice(None)) -> Tensor:
        """Which keys each query row may see. bool ``[B, 1|Hq, rows, keys]``."""
        qp = self.q_pos[:, None, rows, None]  # [B, 1, r, 1]
        kp = self.k_pos[:, None, None, keys]  # [B, 1, 1, k]
        ok = torch.ones(
            qp.shape[0], 1, qp.shape[2], kp.shape[3], dtype=torch.bool, device=self.q.device
        )
        if self.causal:
            ok = ok & (kp <= qp)
        if self.sliding_window is not None:
            ok = ok & (qp - kp < self.sliding_window)
        if self.key_valid is not None:
            ok = ok & self.key_valid[:, None, None, keys]
        if self.mask is not None:
            ok = ok & self.mask[:, :, rows, keys]
        return ok

    def scores(self, rows: slice, keys: slice = slice(None)) -> Tensor:
        """Scaled (and soft-capped) fp32 scores, GQA-aware. ``[B, Hq, rows, keys]``."""
        b, hq, _, d = self.q.shape
        hkv = self.k.shape[1]
        q = self.q[:, :, rows].float().reshape(b, hkv, self.groups, -1, d)  # [B, Hkv, G, r, D]
        k = self.k[:, :, keys].float()  # [B, Hkv, k, D]
        s = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * self.scale  # [B, Hkv, G, r, k]
        s = s.reshape(b, hq, s.shape[-2], s.shape[-1])
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        if self.bias is not None:
            s = s + self.bias[:, :, rows, keys]
        return s


def build_request(
    q: Tensor,
    k: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int = WAAD_WINDOW,
    fai_horizon: tuple[int, int] | None = FAI_HORIZON,
    fai_rows: tuple[int, int] | None = None,
    sink_tokens: int = 1,
    spans: Mapping[str, tuple[int, int]] | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    mask: Tensor | None = None,
    q_pos: Tensor | None = None,
    k_pos: Tensor | None = None,
    metrics: Sequence[str] | None = None,
) -> StatsRequest:
    """Check shapes and parameters (defaults as ``attention_stats``); name the problem in every
    error."""
    if q.dim() != 4 or k.dim() != 4:
        raise ShapeError(
            f"q and k must be 4-D [B, H, T, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    b, hq, tq, d = q.shape
    bk, hkv, tk, dk = k.shape
    if (b, d) != (bk, dk):
        raise ShapeError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head dim [B, H, T, D]"
        )
    if hkv == 0 or hq % hkv:
        raise ShapeError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA"
        )
    if window < 1:
        raise ValueError(f"WAAD window must be >= 1, got {window}")
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    check_horizon(fai_horizon)
    spans = dict(spans or {})
    for name, (start, end) in spans.items():
        if end < start:
            raise ValueError(f"span {name!r} has end {end} < start {start}")
    requested = _normalise_metrics(metrics, spans)

    key_valid, mask4, bias = _split_mask(mask, b, hq, tq, tk)
    kp = _positions(k_pos, b, tk, "k_pos", q.device)
    if kp is None:
        if key_valid is not None:  # left padding: count real tokens only
            kp = key_valid.long().cumsum(-1) - 1
        else:
            kp = torch.arange(tk, device=q.device).expand(b, tk).contiguous()
    qp = _positions(q_pos, b, tq, "q_pos", q.device)
    if qp is None:
        qp = kp[:, tk - tq :] if tq <= tk else torch.arange(tq, device=q.device).expand(b, tq)
        qp = qp.contiguous()
    return StatsRequest(
        q=q,
        k=k,
        q_pos=qp,
        k_pos=kp,
        mask=mask4,
        bias=bias,
        key_valid=key_valid,
        causal=causal,
        scale=float(d**-0.5 if scale is None else scale),
        window=window,
        fai_horizon=fai_horizon,
        fai_rows=fai_rows,
        sink_tokens=sink_tokens,
        spans=spans,
        sliding_window=sliding_window,
        softcap=softcap,
        metrics=requested,
    )


def _normalise_metrics(metrics: Sequence[str] | None, spans: dict) -> tuple[str, ...]:
    span_names = tuple(SPAN_PREFIX + n for n in spans)
    if metrics is None:
        return ROW_METRICS + span_names + COL_METRICS
    known = set(ROW_METRICS + COL_METRICS + span_names)
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise UnsupportedMetricError(
            f"unknown metric(s) {unknown}; available: {sorted(known)} "
            "(span_mass:NAME needs spans={NAME: (start, end)})"
        )
    return tuple(dict.fromkeys(metrics))


def _split_mask(
    mask: Tensor | None, b: int, hq: int, tq: int, tk: int
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Split a mask into key padding ``[B, Tk]``, a bool mask and an additive score bias.

    A 2-D mask is key padding; a 4-D one ``[B, 1|Hq, Tq, Tk]`` is a full mask. Bool and int masks
    mark attended keys. Float masks are additive: very negative entries block a key, and finite
    non-zero entries (interventions that edit pre-softmax scores) are kept as a bias.
    """
    if mask is None:
        return None, None, None
    if mask.dim() == 2:
        if mask.shape != (b, tk):
            raise ShapeError(f"2-D mask must be [B, Tk] = {(b, tk)}, got {tuple(mask.shape)}")
        return mask.bool(), None, None
    if not (
        mask.dim() == 4
        and mask.shape[0] == b
        and mask.shape[1] in (1, hq)
        and mask.shape[2:] == (tq, tk)
    ):
        raise ShapeError(
            f"mask must be [B, Tk] or [B, 1|Hq, Tq, Tk] = [{b}, 1|{hq}, {tq}, {tk}]; "
            f"got {tuple(mask.shape)}"
        )
    if not mask.is_floating_point():
        return None, mask.bool(), None
    allowed = mask > torch.finfo(mask.dtype).min / 2
    bias = torch.where(allowed, mask, 0).float()
    return None, allowed, (bias if bool(bias.any()) else None)


def _positions(pos: Tensor | None, b: int, t: int, name: str, device) -> Tensor | None:
    if pos is None:
        return None
    pos = torch.as_tensor(pos, device=device).long()
    if pos.dim() == 1:
        pos = pos.expand(b, -1)
    pos = pos.contiguous()
    if pos.shape != (b, t):
        raise ShapeError(f"{name} must be [T] or [B, T] = [{b}, {t}], got {tuple(pos.shape)}")
    return pos
