"""Attention credit for TRL's ``GRPOTrainer``: per-token advantages A~_t = gamma_t A_t.

    from attnscope.rl.trl import CreditGRPOTrainer
    trainer = CreditGRPOTrainer(model, reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                                credit_strategy="coupled")

After TRL has sampled and scored a batch, one no-grad forward over each prompt + completion runs
under ``capture`` (the same ``policy_pass`` as attnscope's own trainer, without the LM head); the
credit multipliers turn TRL's advantages ``[B]`` into ``[B, C]``, which TRL's loss accepts as they
are. TRL itself needs no forward at that point when training on-policy, so here, unlike in
``attnscope.rl.grpo``, the statistics cost one extra no-grad forward; ``credit/seconds`` counts it.
Logged metrics: ``credit/boosted`` (share of completion tokens with gamma > 1), ``credit/seconds``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from attnscope.errors import MissingDependencyError
from attnscope.kernels.config import StatsConfig
from attnscope.rl.credit import CreditConfig, Strategy, shape_advantages
from attnscope.rl.grpo import CREDIT_STATS, pack, policy_pass

try:
    from trl import GRPOTrainer
except ImportError as err:
    raise MissingDependencyError(
        f"attnscope.rl.trl needs TRL ({err}): pip install 'trl>=1.16'"
    ) from err


class CreditGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` whose advantages are shaped per token by attention credit."""

    def __init__(
        self,
        *args: Any,
        credit_strategy: Strategy = "coupled",
        credit_config: CreditConfig | None = None,
        stats: StatsConfig = CREDIT_STATS,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.credit_strategy = credit_strategy
        self.credit_config = credit_config or CreditConfig()
        self.stats = stats

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        start = time.perf_counter()
        gamma = self.credit_gammas(output)  # [B, C]
        mask = output["completion_mask"].bool()
        output["advantages"] = shape_advantages(
            output["advantages"][:, None].expand_as(gamma), gamma, self.credit_config.sign
        )
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["credit/boosted"].append(float((gamma[mask] > 1).float().mean()))
        self._metrics[mode]["credit/seconds"].append(time.perf_counter() - start)
        return output

    @torch.no_grad()
    def credit_gammas(self, output: dict[str, Any]) -> Tensor:
        """Multipliers ``[B, C]`` in TRL's completion layout (1 on padding and masked rows)."""
        prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"].bool()
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        lengths = completion_mask.sum(1).tolist()  # [B]: up to and including the EOS
        gamma = torch.ones(completion_ids.shape, device=completion_ids.device)
        rows = [b for b, n in enumerate(lengths) if n > 0]  # rows TRL masked out keep gamma = 1
        if not rows:
            return gamma
        rollout = pack(
            [prompt_ids[b][prompt_mask[b]].cpu() for b in rows],
            [completion_ids[b, : lengths[b]].cpu() for b in rows],
            self._tokenizer.pad_token_id,
        )
        model = self.accelerator.unwrap_model(self.model)
        result = policy_pass(
            model,
            rollout,
            self.credit_strategy,
            self.credit_config,
            stats=self.stats,
            logprobs=False,
        )
        response = rollout.response_mask  # [R, W], right-aligned completions
        for i, b in enumerate(rows):
            gamma[b, : lengths[b]] = result.gamma[i, response[i]].to(gamma.device)
        return gamma
