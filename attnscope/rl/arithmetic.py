"""A verifiable task for GRPO on an instruct policy: two-step arithmetic word problems
(``attnscope.findings.problems``), asked under the tokenizer's chat template. Reward, checked
against the problem's own steps: 0.5 when the completion writes the first step's result, plus 0.5
when its last number is the answer (a denser signal than the answer alone for a small policy).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from attnscope.errors import AttnscopeError
from attnscope.findings.problems import TwoStepProblem, correct, numbers
from attnscope.generation import cut_at_eos, eos_ids, greedy_generate, left_pad, pad_token_id


class ArithmeticTask:
    """Prompts (chat-templated when the tokenizer has a template and ``chat``) for ``problems``
    and the reward of completions to them: ``task.reward`` is a ``RewardFn``."""

    def __init__(self, tokenizer: Any, problems: Sequence[TwoStepProblem], chat: bool = True):
        if chat and not getattr(tokenizer, "chat_template", None):
            raise AttnscopeError(
                "the tokenizer has no chat template: use an instruct model (e.g. "
                "smollm2-135m-instruct) or ArithmeticTask(..., chat=False)"
            )
        self.problems = list(problems)
        self.prompts = [self._prompt(tokenizer, p, chat) for p in self.problems]
        self._by_prompt = dict(zip(self.prompts, self.problems, strict=True))

    @staticmethod
    def _prompt(tokenizer: Any, problem: TwoStepProblem, chat: bool) -> str:
        if not chat:
            return problem.prompt
        messages = [{"role": "user", "content": problem.question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def reward(self, prompts: list[str], completions: list[str]) -> list[float]:
        """Per completion: 0.5 if it writes the result of its problem's first step, + 0.5 if its
        last number is the answer."""
        return [
            step_reward(self._by_prompt[p], c) for p, c in zip(prompts, completions, strict=True)
        ]

    def solved(self, prompts: list[str], completions: list[str]) -> list[bool]:
        """Whether each completion's last number is the answer of its prompt's problem."""
        return [correct(self._by_prompt[p], c) for p, c in zip(prompts, completions, strict=True)]

    def batches(self, steps: int, size: int, seed: int) -> Iterator[list[str]]:
        """``steps`` batches of ``size`` prompts drawn (seeded) from the task's prompts."""
        rng = random.Random(seed)
        for _ in range(steps):
            yield rng.sample(self.prompts, size)

    @torch.no_grad()
    def accuracy(self, model: Any, tokenizer: Any, max_new_tokens: int) -> float:
        """Share of the task's problems answered correctly by greedy decoding (one batch; prompts
        tokenized as ``GRPOTrainer`` samples them)."""
        encoded = [torch.tensor(tokenizer(p).input_ids) for p in self.prompts]
        ids, mask = left_pad(encoded, pad_token_id(model, tokenizer))  # [P, T0]
        was_training = model.training
        model.eval()
        try:
            with tqdm(disable=True) as bar:
                out = greedy_generate(model, tokenizer, ids, mask, max_new_tokens, bar)
        finally:
            model.train(was_training)
        stop = eos_ids(model, tokenizer)
        new = out.sequences[:, ids.shape[1] :].cpu()  # [P, generated]
        texts = tokenizer.batch_decode([cut_at_eos(r, stop) for r in new], skip_special_tokens=True)
        return sum(self.solved(self.prompts, texts)) / len(texts)


def step_reward(problem: TwoStepProblem, completion: str) -> float:
    """0.5 if ``completion`` writes the result of the first of ``problem.steps``, + 0.5 if its last
    number is the answer."""
    first = float(problem.steps[0].rsplit("=", 1)[1])
    return 0.5 * (first in numbers(completion)) + 0.5 * correct(problem, completion)
