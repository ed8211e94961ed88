"""PAINT-style visual token boosting: raise the current row's pre-softmax scores on informed image
tokens in the language model's layers [start, end).

Per image, from the vision tower's class-token attention (``vlm.vision.ClassTokenScores``):
'local' tokens are the top ``local_fraction`` by the score in an early layer; 'summary' tokens are
the outliers (above Q3 + 1.5 IQR) of the score in the penultimate layer; local tokens that are
also summary tokens count as summary. Scores a become a + alpha |a| (local) and a + beta |a|
(summary). ``heads`` restricts the boost to chosen heads (``vlm.visual_heads`` picks those with
the largest measured visual mass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnscope.errors import AttnscopeError
from attnscope.interventions.base import EditSession, ScoreEdit
from attnscope.probes.session import Observer
from attnscope.vlm.vision import ClassTokenScores


@dataclass
class VisualBoost(ScoreEdit):
    alpha: float = 0.7  # boost of local tokens
    beta: float = 0.3  # boost of summary tokens
    start: int = 2
    end: int | None = None
    local_layer: int = 0  # vision layer whose class-token attention picks local tokens
    local_fraction: float = 0.25
    summary_layer: int = -2  # vision layer whose class-token attention picks summary tokens
    heads: dict[int, Tensor] | None = None  # layer -> bool [n_heads]; None: every head

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.local_fraction <= 1:
            raise ValueError(f"local_fraction must be in (0, 1], got {self.local_fraction}")

    def observers(self, session: EditSession) -> list[Observer]:
        layout = session.layout
        if layout is None:
            raise AttnscopeError("VisualBoost needs the image layout: applied(model, layout)")
        observer = ClassTokenScores(session.probe, layout, {self.local_layer, self.summary_layer})
        session.state.update(observer=observer, version=None)
        return [observer]

    def tokens(self, session: EditSession) -> tuple[Tensor, Tensor]:
        """LLM positions of the local and summary tokens chosen from the last vision-tower pass."""
        observer: ClassTokenScores = session.state["observer"]
        if session.state["version"] != observer.version:
            local, summary = [], []
            pairs = zip(
                observer.token_scores(self.local_layer),
                observer.token_scores(self.summary_layer),
                session.layout.images,
                strict=True,
            )
            for local_score, summary_score, span in pairs:
                l_idx, s_idx = select_tokens(local_score, summary_score, self.local_fraction)
                local.append(span.start + l_idx)
                summary.append(span.start + s_idx)
            session.state.update(
                local=torch.cat(local), summary=torch.cat(summary), version=observer.version
            )
        return session.state["local"], session.state["summary"]

    def row_bias(
        self, session: EditSession, layer: int, scores: Tensor, allowed: Tensor, key_pos: Tensor
    ) -> Tensor | None:
        if self.alpha == 0 and self.beta == 0:
            return None
        local, summary = (t.to(key_pos.device) for t in self.tokens(session))
        weight = self.alpha * torch.isin(key_pos, local) + self.beta * torch.isin(key_pos, summary)
        bias = scores.abs() * weight  # [B, Hq, 1, Tk]
        if self.heads is not None:
            chosen = self.heads.get(layer)
            if chosen is None or not chosen.any():
                return None
            bias = bias * chosen.to(bias.device)[None, :, None, None]
        return bias


def select_tokens(
    local_score: Tensor, summary_score: Tensor, local_fraction: float
) -> tuple[Tensor, Tensor]:
    """Indices of local tokens (top ``local_fraction`` by ``local_score``, summary tokens
    removed) and of summary tokens (``summary_score`` above Q3 + 1.5 IQR). ``[n]`` -> two sets."""
    q1, q3 = torch.quantile(summary_score, torch.tensor([0.25, 0.75])).tolist()
    summary = (summary_score > q3 + 1.5 * (q3 - q1)).nonzero()[:, 0]
    top = torch.topk(local_score, max(1, int(local_score.numel() * local_fraction))).indices
    local = top[~torch.isin(top, summary)].sort().values
    return local, summary
