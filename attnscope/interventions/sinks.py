"""Sink suppression: take the attention share of sink tokens away from the current query row.

Without targets the sinks' share is removed and the rest renormalised (their scores are set to
-inf). With ``redirect_to`` the share goes to the target tokens in proportion to what they already
get: p'_g = p_g (1 + m / P_G), m the sinks' share, P_G the targets' (a bias log(1 + m / P_G) on the
targets); rows that see no target are only renormalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attnscope.interventions.base import EditSession, ScoreEdit
from attnscope.trace import Trace
from attnscope.vlm.metrics import SINK_FACTOR, visual_sinks


@dataclass
class SinkSuppression(ScoreEdit):
    tokens: Sequence[int] = ()  # positions of the sink tokens
    redirect_to: Sequence[int] | None = None  # positions that receive the sinks' share
    start: int = 0
    end: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tokens:
            raise ValueError("SinkSuppression needs the positions of the sink tokens")

    def measured(self, session: EditSession) -> Tensor:
        """Records track the mass on the sinks (on the image tokens when the layout is known)."""
        if session.layout is not None:
            return super().measured(session)
        return torch.as_tensor(list(self.tokens))

    def row_bias(
        self, session: EditSession, layer: int, scores: Tensor, allowed: Tensor, key_pos: Tensor
    ) -> Tensor | None:
        sink = torch.isin(key_pos, torch.as_tensor(list(self.tokens), device=key_pos.device))
        sink = sink & allowed  # [B, 1|Hq, 1, Tk]
        if not sink.any():
            return None
        bias = torch.zeros_like(scores).masked_fill(sink, float("-inf"))  # [B, Hq, 1, Tk]
        if self.redirect_to is None:
            return bias
        target = torch.isin(key_pos, torch.as_tensor(list(self.redirect_to), device=key_pos.device))
        target = target & allowed & ~sink
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        moved = (p * sink).sum(-1, keepdim=True)  # [B, Hq, 1, 1]
        kept = (p * target).sum(-1, keepdim=True)
        boost = torch.log1p(moved / kept.clamp_min(torch.finfo(p.dtype).tiny))
        return torch.where(target & (kept > 0), boost, bias)


def detect_sinks(trace: Trace, factor: float = SINK_FACTOR, min_fraction: float = 0.5) -> list[int]:
    """Image tokens that are visual sinks (``vlm.visual_sinks``) in at least ``min_fraction`` of
    the captured (layer, head) pairs: candidates for ``SinkSuppression(tokens=...)``."""
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    share = visual_sinks(trace, factor).float().mean((0, 1))  # [T]
    return (share >= min_fraction).nonzero()[:, 0].tolist()
