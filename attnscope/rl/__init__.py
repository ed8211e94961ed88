"""Attention-derived token credit for RL fine-tuning (preplan / anchor tokens), a compact GRPO
trainer that takes its statistics from the policy's own forward pass, and (with TRL installed)
``attnscope.rl.trl.CreditGRPOTrainer``."""

from attnscope.rl.credit import (
    CreditConfig,
    Rhythm,
    gammas,
    rhythm,
    sample_layers,
    shape_advantages,
    token_sets,
)
from attnscope.rl.grpo import GRPOConfig, GRPOTrainer, StepLog, group_advantages, grpo_loss

__all__ = [
    "CreditConfig",
    "GRPOConfig",
    "GRPOTrainer",
    "Rhythm",
    "StepLog",
    "gammas",
    "group_advantages",
    "grpo_loss",
    "rhythm",
    "sample_layers",
    "shape_advantages",
    "token_sets",
]
