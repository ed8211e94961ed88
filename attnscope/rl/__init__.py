"""Attention-derived token credit for RL fine-tuning (preplan / anchor tokens)."""

from attnscope.rl.credit import (
    CreditConfig,
    Rhythm,
    gammas,
    rhythm,
    sample_layers,
    shape_advantages,
    token_sets,
)

__all__ = [
    "CreditConfig",
    "Rhythm",
    "gammas",
    "rhythm",
    "sample_layers",
    "shape_advantages",
    "token_sets",
]
