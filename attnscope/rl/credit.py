"""Attention-derived token credit: the credit multipliers gamma_t of the local, global and coupled
strategies (and the random / high-entropy baselines) from the preplan and anchor tokens that
``attnscope.rhythm`` detects, and the shaped advantages A~_t = gamma_t A_t (METRICS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from attnscope.errors import AttnscopeError
from attnscope.rhythm import Rhythm, RhythmConfig, top_fraction

Strategy = Literal["local", "global", "coupled", "random", "entropy"]


@dataclass(frozen=True)
class CreditConfig(RhythmConfig):
    """The detection parameters of ``RhythmConfig`` plus those of the multipliers."""

    gamma_amp: float = 1.5
    alpha: float = 0.5  # coupled: share of a dominated anchor's boost moved to its intro token
    sign: Literal["both", "positive"] = "both"  # which advantages are shaped
    seed: int = 0  # for the random-token baseline


def gammas(r: Rhythm, strategy: Strategy, config: CreditConfig = CreditConfig()) -> Tensor:
    """Credit multipliers gamma_t [R] of a strategy (and the random / high-entropy baselines)."""
    boost = config.gamma_amp - 1
    if strategy == "local":
        chosen = r.preplan.float()
    elif strategy == "global":
        chosen = r.anchor.float()
    elif strategy == "coupled":
        a = config.alpha
        chosen = (
            (r.anchor & ~r.dominated).float() + (1 - a) * r.dominated.float() + a * r.intro.float()
        )
    elif strategy == "random":  # as many tokens as anchors, uniformly at random
        g = torch.Generator().manual_seed(config.seed)
        chosen = torch.zeros(r.anchor.numel())
        chosen[torch.randperm(r.anchor.numel(), generator=g)[: int(r.anchor.sum())]] = 1.0
    elif strategy == "entropy":
        chosen = top_fraction(r.entropy, config.quantile).float()
    else:
        raise AttnscopeError(
            f"unknown credit strategy {strategy!r}; choose local, global, coupled, random, entropy"
        )
    return 1 + boost * chosen


def shape_advantages(
    advantages: Tensor, gamma: Tensor, sign: Literal["both", "positive"] = "both"
) -> Tensor:
    """A~_t = gamma_t * A_t, detached; ``positive`` shapes only positive advantages."""
    gamma = gamma.to(advantages)
    if sign == "positive":
        gamma = torch.where(advantages > 0, gamma, torch.ones_like(gamma))
    elif sign != "both":
        raise AttnscopeError(f"sign must be 'both' or 'positive', got {sign!r}")
    return (gamma * advantages).detach()
