"""Score interventions: additive edits of the current query row's pre-softmax scores.

An intervention is a parameter object (``VisualBoost``, ``SinkSuppression``); ``applied(model,
layout)`` returns the context manager that runs it. While it is active, every call of the model's
decoder self-attention goes through the probe's attention function (SDPA stays SDPA, eager stays
eager) and a mask editor attached to the model's probe session (``probes.session``) folds the
edit into the layer's mask: the mask it
receives becomes an additive float mask (0 / min where keys are allowed / blocked; a float mask, e.g.
another intervention's, is kept) plus the bias on the edited row. The current query row is the last
row of each call: the new token during ``generate()``, the last prompt token at prefill. On exit the
attention implementation of every config is restored and the editor removed, also after an
exception.

A capture in the same run sees the edited mask, so its statistics include the edit (kernels read a
float mask's finite part as a score bias). ``records`` keep the direct effect per edited row: its
attention mass on the measured keys (the image tokens) before and after the edit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnscope.errors import AttnscopeError
from attnscope.kernels.request import build_request
from attnscope.probes.session import AttentionCall, Observer, ProbeSession
from attnscope.vlm.layout import ImageLayout


@dataclass
class EditRecord:
    layer: int
    position: int  # query position of the edited row
    before: Tensor  # [B, Hq] attention mass on the measured keys before the edit
    after: Tensor  # [B, Hq] ... and after


class ScoreEdit(ABC):
    """Base of score interventions on decoder layers ``[start, end)`` (end None: to the last)."""

    start: int
    end: int | None

    def __post_init__(self) -> None:
        if self.start < 0 or (self.end is not None and self.end <= self.start):
            raise ValueError(
                f"intervention layers [{self.start}, {self.end}) are empty or negative"
            )

    def applied(self, model: torch.nn.Module, layout: ImageLayout | None = None) -> EditSession:
        """The context manager that applies this edit to ``model`` (``layout``: its images)."""
        return EditSession(self, model, layout)

    @abstractmethod
    def row_bias(
        self, session: EditSession, layer: int, scores: Tensor, allowed: Tensor, key_pos: Tensor
    ) -> Tensor | None:
        """Additive bias ``[B, 1|Hq, 1, Tk]`` for the current row, or None for no edit.

        scores: the row's scaled (soft-capped) scores ``[B, Hq, 1, Tk]``, earlier edits included;
        allowed: bool ``[B, 1|Hq, 1, Tk]`` keys the row may see; key_pos: ``[Tk]`` key positions.
        """

    def measured(self, session: EditSession) -> Tensor:
        """Positions whose attention mass ``records`` track (default: the image tokens)."""
        if session.layout is None:
            raise AttnscopeError(f"{type(self).__name__} needs the image layout of the input")
        return session.layout.positions

    def observers(self, session: EditSession) -> list[Observer]:
        """Observers to attach beside the edit while it is applied (e.g. vision-tower scores)."""
        return []


class EditSession:
    """One application of a ``ScoreEdit`` to a model (context manager)."""

    def __init__(self, edit: ScoreEdit, model: torch.nn.Module, layout: ImageLayout | None) -> None:
        self.probe = ProbeSession.of(model)
        self.edit = edit
        self.model = model
        self.layout = layout
        self.records: list[EditRecord] = []
        self.state: dict[str, Any] = {}  # per-run state of the edit (e.g. chosen tokens)
        self._layers = self.probe.layers("decoder")
        n_layers = len(set(self._layers.values()))
        self.end = n_layers if edit.end is None else edit.end
        if not edit.start < self.end <= n_layers:
            raise AttnscopeError(
                f"intervention layers [{edit.start}, {self.end}) outside the model's "
                f"{n_layers} decoder layers [0, {n_layers}): choose start and end"
            )
        self._stack: ExitStack | None = None

    def __enter__(self) -> EditSession:
        with ExitStack() as stack:
            stack.enter_context(self.probe.attached(editor=self._edit_mask))
            for observer in self.edit.observers(self):
                stack.enter_context(self.probe.attached(observer=observer))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @torch.no_grad()
    def _edit_mask(self, call: AttentionCall) -> Tensor | None:
        layer = self._layers.get(call.module)
        if layer is None or not self.edit.start <= layer < self.end:
            return None
        query, key, mask = call.query, call.key, call.mask
        tq, tk = query.shape[2], key.shape[2]
        key_pos = call.k_index
        req = build_request(  # the last row sees every key its mask allows
            query[:, :, -1:],
            key,
            causal=False,
            scale=call.scale,
            softcap=call.softcap,
            mask=None if mask is None else mask[:, :, -1:, :tk],
            metrics=[],
        )
        everything = slice(None)
        scores = req.scores(everything)  # [B, Hq, 1, Tk], an earlier edit's bias included
        allowed = req.allowed(everything)  # [B, 1|Hq, 1, Tk]
        bias = self.edit.row_bias(self, layer, scores, allowed, key_pos)
        if bias is None:
            return None
        self._record(layer, int(call.q_index[-1]), scores, allowed, bias, key_pos)
        return with_row_bias(additive_mask(mask, tq, tk, query.dtype, query.device), bias)

    def _record(self, layer, position, scores, allowed, bias, key_pos) -> None:
        on = torch.isin(key_pos, self.edit.measured(self).to(key_pos.device))  # [Tk]
        blocked = scores.masked_fill(~allowed, float("-inf"))
        before = torch.softmax(blocked, -1)[..., 0, :]  # [B, Hq, Tk]
        after = torch.softmax(blocked + bias, -1)[..., 0, :]
        self.records.append(
            EditRecord(layer, position, (before * on).sum(-1).cpu(), (after * on).sum(-1).cpu())
        )

    def summary(self) -> dict[str, Any]:
        """Parameters and, per edited layer, the mean measured mass before and after (JSON)."""
        per_layer: dict[int, list[EditRecord]] = {}
        for r in self.records:
            per_layer.setdefault(r.layer, []).append(r)
        params = {
            k: list(v) if isinstance(v, list | tuple) else v
            for k, v in vars(self.edit).items()
            if isinstance(v, int | float | str | None)
            or (isinstance(v, list | tuple) and all(isinstance(x, int) for x in v))
        }
        return {
            "name": type(self.edit).__name__,
            **params,
            "edited_rows": len(self.records),
            "mass_before": {
                str(k): float(torch.stack([r.before for r in v]).mean())
                for k, v in per_layer.items()
            },
            "mass_after": {
                str(k): float(torch.stack([r.after for r in v]).mean())
                for k, v in per_layer.items()
            },
        }


def additive_mask(
    mask: Tensor | None, tq: int, tk: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The mask a causal layer received as an additive float mask ``[B|1, 1|Hq, Tq, Tk]``: 0 / min
    for allowed / blocked keys (None: causal, aligned to the end of the keys); float masks as they
    are."""
    if mask is not None and mask.is_floating_point():
        return mask[..., :tk].to(dtype)
    if mask is None:
        rows = torch.arange(tk - tq, tk, device=device)[:, None]
        allowed = (torch.arange(tk, device=device)[None] <= rows)[None, None]
    else:
        allowed = mask[..., :tk].bool()
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


def with_row_bias(base: Tensor, bias: Tensor) -> Tensor:
    """``base`` (additive ``[B|1, 1|Hq, Tq, Tk]``) plus ``bias`` ``[B, 1|Hq, 1, Tk]`` on the last
    row's allowed keys. ``[B, 1|Hq, Tq, Tk]``."""
    last = base[:, :, -1:]
    allowed = last > torch.finfo(base.dtype).min / 2
    row = last + torch.where(allowed, bias, 0.0).to(base.dtype)
    b, h = row.shape[0], row.shape[1]
    return torch.cat([base[:, :, :-1].expand(b, h, -1, -1), row], dim=2)
