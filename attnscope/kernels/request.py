"""Validated inputs of ``attention_stats`` and the pieces every backend shares (positions, masks)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attnscope.errors import ShapeError, UnsupportedMetricError
from attnscope.kernels.config import StatsConfig
from attnscope.kernels.table import SINK_METRICS, axis_of, known_metrics
from attnscope.kernels.table import SPAN_PREFIX as SPAN_PREFIX  # re-exported for the backends


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
    config: StatsConfig = field(default_factory=StatsConfig)
    sinks: Tensor | None = None  # [Hq] learned sink logits

    @property
    def groups(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    def wants(self, name: str) -> bool:
        return name in self.metrics

    @property
    def row_metrics(self) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if axis_of(m) == "row")

    @property
    def col_metrics(self) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if axis_of(m) == "col")

    def by_position(self, qp: Tensor, kp: Tensor) -> Tensor:
        """Which (query, key) positions causality and the sliding window allow: bool, the
        broadcast shape of ``qp`` and ``kp``."""
        ok = torch.ones(
            torch.broadcast_shapes(qp.shape, kp.shape), dtype=torch.bool, device=qp.device
        )
        if self.causal:
            ok = ok & (kp <= qp)
        if self.sliding_window is not None:
            ok = ok & (qp - kp < self.sliding_window)
        return ok

    def allowed(self, rows: slice, keys: slice = slice(None)) -> Tensor:
        """Which keys each query row may see. bool ``[B, 1|Hq, rows, keys]``."""
        qp = self.q_pos[:, None, rows, None]  # [B, 1, r, 1]
        kp = self.k_pos[:, None, None, keys]  # [B, 1, 1, k]
        ok = self.by_position(qp, kp)  # [B, 1, r, k]
        if self.key_valid is not None:
            ok = ok & self.key_valid[:, None, None, keys]
        if self.mask is not None:
            ok = ok & self.mask[:, :, rows, keys]
        return ok

    @property
    def compute_dtype(self) -> torch.dtype:
        """fp32 for half-precision inputs, the input's own precision above (float64 stays)."""
        return torch.promote_types(self.q.dtype, torch.float32)

    def scores(self, rows: slice, keys: slice = slice(None)) -> Tensor:
        """Scaled (and soft-capped) scores in ``compute_dtype``, GQA-aware. ``[B, Hq, rows, keys]``."""
        b, hq, _, d = self.q.shape
        hkv = self.k.shape[1]
        dtype = self.compute_dtype
        q = self.q[:, :, rows].to(dtype).reshape(b, hkv, self.groups, -1, d)  # [B, Hkv, G, r, D]
        k = self.k[:, :, keys].to(dtype)  # [B, Hkv, k, D]
        s = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * self.scale  # [B, Hkv, G, r, k]
        s = s.reshape(b, hq, s.shape[-2], s.shape[-1])
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        if self.bias is not None:
            s = s + self.bias[:, :, rows, keys].to(dtype)
        return s

    def with_sink(self, lse: Tensor) -> Tensor:
        """Log-normaliser over the keys ``[B, Hq, r]`` -> over the keys and the learned sink
        (a virtual key with logit ``sinks[h]``); rows that see no key stay -inf."""
        if self.sinks is None:
            return lse
        sink = self.sinks.to(lse.dtype)[:, None]  # [Hq, 1]
        return torch.where(torch.isfinite(lse), torch.logaddexp(lse, sink), lse)

    def sink_probability(self, lse: Tensor) -> Tensor:
        """The learned sink's probability per row ``[B, Hq, r]`` from the full log-normaliser
        ``with_sink(...)``; NaN for rows that see no key. Needs ``sinks``."""
        assert self.sinks is not None
        p = torch.exp(self.sinks.to(lse.dtype)[:, None] - lse)  # [B, Hq, r]
        return torch.where(torch.isfinite(lse), p, float("nan"))


def build_request(
    q: Tensor,
    k: Tensor,
    config: StatsConfig | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    mask: Tensor | None = None,
    q_pos: Tensor | None = None,
    k_pos: Tensor | None = None,
    sinks: Tensor | Sequence[float] | None = None,
    **shortcuts: Any,
) -> StatsRequest:
    """Check the inputs of one attention call and the statistics ``config`` (keyword
    ``shortcuts`` such as ``window=`` or ``metrics=`` override its fields); name the problem in
    every error. ``sinks`` ``[Hq]``: learned sink logits (gpt-oss), one per query head."""
    config = StatsConfig.build(config, **shortcuts)
    if isinstance(config.fai_rows, str):
        raise ValueError(
            f"fai_rows={config.fai_rows!r} needs a generation to resolve it; give (start, end) "
            "positions here (StatsConfig.resolved(n_prompt, n_total) does it for a generation)"
        )
    _check_tensors(q, k)
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if softcap is not None and not (0 < softcap < math.inf):
        raise ValueError(f"softcap must be finite and > 0, got {softcap}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    _check_spans(config.spans, tk, defaults=k_pos is None)
    sink_logits = _sinks(sinks, hq, q.device)
    has_sinks = sink_logits is not None
    requested = config.metrics
    if requested is None:
        requested = known_metrics(config.span_names, sinks=has_sinks)
    wanted = [m for m in requested if m in SINK_METRICS]
    if wanted and not has_sinks:
        raise UnsupportedMetricError(
            f"{', '.join(wanted)} needs learned sink logits (sinks=[Hq], as in gpt-oss) and this "
            "attention call has none: leave it out of metrics"
        )

    key_valid, mask4, bias = _split_mask(mask, b, hq, tq, tk, q.device)
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
        window=config.window,
        fai_horizon=config.fai_horizon,
        fai_rows=config.fai_rows,
        sink_tokens=config.sink_tokens,
        spans=config.span_dict,
        sliding_window=sliding_window,
        softcap=softcap,
        metrics=requested,
        config=config,
        sinks=sink_logits,
    )


def _check_tensors(q: Tensor, k: Tensor) -> None:
    """Shapes ``[B, H, T, D]`` with GQA-compatible heads, one floating dtype and device, finite
    values, at least one key (no query, ``Tq = 0``, gives empty rows)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ShapeError(
            f"q and k must be 4-D [B, H, T, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    b, hq, _, d = q.shape
    bk, hkv, _, dk = k.shape
    if (b, d) != (bk, dk):
        raise ShapeError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head dim [B, H, T, D]"
        )
    if hkv == 0 or hq % hkv:
        raise ShapeError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA"
        )
    if not (q.is_floating_point() and k.is_floating_point()):
        raise ShapeError(f"q and k must be floating point, got {q.dtype} and {k.dtype}")
    if b == 0 or d == 0:
        raise ShapeError(f"q and k need a batch and a head dim > 0; got q {tuple(q.shape)}")
    if k.shape[2] == 0:
        raise ShapeError(
            f"k {tuple(k.shape)} has no key (Tk = 0): queries need at least one key to attend to"
        )
    if q.device != k.device:
        raise ShapeError(f"q and k must be on one device, got q on {q.device} and k on {k.device}")
    if q.dtype != k.dtype:
        raise ShapeError(
            f"q and k must have one dtype, got {q.dtype} and {k.dtype}: cast one (k.to(q.dtype))"
        )
    _check_finite(q, "q")
    _check_finite(k, "k")


def _sinks(sinks: Tensor | Sequence[float] | None, hq: int, device: torch.device) -> Tensor | None:
    """Learned sink logits as a finite float tensor ``[Hq]`` on ``device``, or None."""
    if sinks is None:
        return None
    s = torch.as_tensor(sinks, device=device).detach()
    if not s.is_floating_point():
        raise ShapeError(f"sinks must be floating point logits, got {s.dtype}")
    if s.shape != (hq,):
        raise ShapeError(
            f"sinks must be [Hq] = [{hq}] learned sink logits, one per query head; "
            f"got {tuple(s.shape)}"
        )
    _check_finite(s, "sinks")
    return s


def _check_finite(t: Tensor, name: str) -> None:
    """Refuse NaN / inf entries: they would turn the statistics into NaN without a word."""
    # one reduction without a copy; only a non-finite sum (or an overflow) needs the exact look
    if bool(torch.isfinite(t.sum(dtype=torch.promote_types(t.dtype, torch.float32)))):
        return
    bad = (~torch.isfinite(t)).nonzero()
    if len(bad):
        raise ShapeError(
            f"{name} {tuple(t.shape)} holds {len(bad)} NaN or inf value(s), the first at index "
            f"{tuple(bad[0].tolist())}: check the model's activations (fp16 overflow?)"
        )


def _check_spans(spans: tuple[tuple[str, tuple[int, int]], ...], tk: int, defaults: bool) -> None:
    """Spans are key positions ``[start, end)``: never negative, and with the default positions
    (keys ``0..Tk-1``) within ``[0, Tk]``. With explicit positions a span may lie ahead of the
    keys seen so far (the prompt's forward pass of a generation)."""
    limit = f"[0, {tk}] (Tk = {tk} key positions)" if defaults else "key positions >= 0"
    for name, (start, end) in spans:
        if start < 0 or (defaults and end > tk):
            raise ShapeError(f"span {name!r} = [{start}, {end}) is outside {limit}")


def _split_mask(
    mask: Tensor | None, b: int, hq: int, tq: int, tk: int, device: torch.device
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Split a mask into key padding ``[B, Tk]``, a bool mask and an additive score bias.

    A 2-D mask is key padding; a 4-D one ``[B, 1|Hq, Tq, Tk]`` is a full mask. Bool and int masks
    mark attended keys. Float masks are additive: very negative entries block a key, and finite
    non-zero entries (interventions that edit pre-softmax scores) are kept as a bias.
    """
    if mask is None:
        return None, None, None
    if mask.is_complex():
        raise ShapeError(f"mask must be bool, integer or float, got {mask.dtype}")
    if mask.device != device:
        raise ShapeError(f"mask must be on the device of q ({device}), got {mask.device}")
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
    bias = torch.where(allowed, mask, 0).to(torch.promote_types(mask.dtype, torch.float32))
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
