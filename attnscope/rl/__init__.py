"""Attention-derived token credit for RL fine-tuning (from the preplan / anchor tokens of
``attnscope.rhythm``), a compact GRPO trainer that takes its statistics from the policy's own
forward pass, and (with TRL installed) ``attnscope.rl.trl.CreditGRPOTrainer``."""

from attnscope.rhythm import rhythm
from attnscope.rl.credit import CreditConfig, Strategy, gammas, shape_advantages
from attnscope.rl.grpo import GRPOConfig, GRPOTrainer, StepLog, group_advantages, grpo_loss

__all__ = [
    "CreditConfig",
    "GRPOConfig",
    "GRPOTrainer",
    "StepLog",
    "Strategy",
    "gammas",
    "group_advantages",
    "grpo_loss",
    "rhythm",
    "shape_advantages",
]
