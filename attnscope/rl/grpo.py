"""Compact GRPO for Hugging Face causal LMs, with attention credit from the policy's own forward.

One step: sample a group of completions per prompt, score them with a verifiable reward, normalise
rewards within each group, then minimise the clipped token-level GRPO loss with shaped advantages
A~_t = gamma_t A_t (no KL term). The credit multipliers gamma_t (METRICS.md, reasoning rhythm) come
from attention statistics that ``capture`` computes while the training forward over
prompt + completion runs: no second, eager pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from attnscope.errors import AttnscopeError, ShapeError
from attnscope.generation import cut_at_eos, eos_ids, left_pad, pad_token_id, padded_positions
from attnscope.kernels.config import StatsConfig
from attnscope.probes.capture import Capture
from attnscope.probes.session import AttentionCall
from attnscope.rhythm import Rhythm, rhythm, sample_layers
from attnscope.rl.credit import CreditConfig, Strategy, gammas, shape_advantages
from attnscope.trace import Trace

CREDIT_STATS = StatsConfig(metrics=("waad", "mean_distance", "entropy", "fai"))
DEFAULT_CREDIT = CreditConfig()
RewardFn = Callable[[list[str], list[str]], Sequence[float]]  # (prompts, completions) -> rewards


@dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 8  # completions sampled per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0  # sampling is from the full distribution (no top-k / top-p)
    lr: float = 1e-5
    clip_eps: float = 0.2
    iterations: int = 1  # optimisation passes over each batch of samples (mu)
    max_grad_norm: float = 1.0
    strategy: Strategy | None = "coupled"  # None: plain GRPO, every gamma_t = 1
    credit: CreditConfig = field(default_factory=CreditConfig)
    # statistics the credit reads; policy_pass sets the layers and the FAI rows per rollout
    stats: StatsConfig = field(default_factory=lambda: CREDIT_STATS)


# -- loss ---------------------------------------------------------------------------------------
def group_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """(r - group mean) / (group std + 1e-4) for consecutive groups of ``group_size``. [B] -> [B]."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ShapeError(
            f"{rewards.numel()} rewards do not split into groups of {group_size} (need >= 2 each)"
        )
    groups = rewards.float().view(-1, group_size)  # [P, G]
    adv = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    return adv.flatten()


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    gamma: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    sign: Literal["both", "positive"] = "both",
) -> Tensor:
    """Clipped token-level GRPO loss with A~_t = gamma_t A_t, averaged over every masked token.

    ``logp``, ``old_logp``, ``gamma``, ``mask`` (bool): [B, W]; ``advantages``: [B] per sequence.
    Gradients reach ``logp`` only: the old log-probs, advantages and multipliers are detached.
    """
    if not logp.shape == old_logp.shape == gamma.shape == mask.shape:
        raise ShapeError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, gamma "
            f"{tuple(gamma.shape)} and mask {tuple(mask.shape)} must have one shape [B, W]"
        )
    if advantages.shape != logp.shape[:1]:
        raise ShapeError(f"advantages {tuple(advantages.shape)} must be [B={logp.shape[0]}]")
    if not mask.any():
        raise AttnscopeError("the loss mask selects no token")
    shaped = shape_advantages(advantages[:, None].expand_as(logp), gamma, sign)  # [B, W]
    ratio = torch.exp(logp - old_logp.detach())  # [B, W]
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = -torch.minimum(ratio * shaped, clipped * shaped)  # [B, W]
    return per_token[mask.bool()].mean()


# -- rollouts -------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """Prompt + completion of each sample, left-padded to one length T so every response ends at T.

    Completions run up to and including the first EOS. Log-probs and multipliers live on the last
    ``width`` positions (the longest completion), right-aligned: sample b's completion token j sits
    at column ``width - completion_lens[b] + j``.
    """

    ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    prompt_lens: list[int]
    completion_lens: list[int]

    @property
    def width(self) -> int:
        return max(self.completion_lens)

    @property
    def position_ids(self) -> Tensor:  # [B, T] real positions, as generate() uses them
        return padded_positions(self.attention_mask)

    @property
    def response_mask(self) -> Tensor:  # [B, W] bool, True on completion tokens
        first = self.width - torch.tensor(self.completion_lens)  # [B]
        return torch.arange(self.width)[None] >= first[:, None]


def pack(prompts: Sequence[Tensor], completions: Sequence[Tensor], pad_id: int) -> Rollout:
    """Left-pad ``prompt_b + completion_b`` (1-d id tensors) into one batch."""
    if len(prompts) != len(completions) or not prompts:
        raise ShapeError(f"{len(prompts)} prompts for {len(completions)} completions")
    if any(p.numel() == 0 for p in prompts) or any(c.numel() == 0 for c in completions):
        raise ShapeError("every prompt and completion needs at least one token")
    ids, mask = left_pad(
        [torch.cat([p, c]) for p, c in zip(prompts, completions, strict=True)], pad_id
    )
    return Rollout(ids, mask, [p.numel() for p in prompts], [c.numel() for c in completions])


@torch.no_grad()
def sample(
    model: Any, tokenizer: Any, prompts: Sequence[str], config: GRPOConfig
) -> tuple[list[Tensor], list[Tensor]]:
    """``group_size`` completions per prompt: prompt ids and completion ids (cut at EOS), [P * G]."""
    encoded = [
        torch.tensor(tokenizer(p).input_ids) for p in prompts for _ in range(config.group_size)
    ]
    pad, stop = pad_token_id(model, tokenizer), eos_ids(model, tokenizer)
    ids, mask = left_pad(encoded, pad)  # [B, T0]
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            do_sample=True,
            temperature=config.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=config.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=stop or None,
        ).cpu()  # [B, T0 + N]
    finally:
        model.train(was_training)
    return encoded, [cut_at_eos(row, stop) for row in out[:, ids.shape[1] :]]


# -- one forward with credit ----------------------------------------------------------------------
class _TimedCapture(Capture):
    """Capture that adds up the seconds spent computing statistics inside the forward."""

    seconds: float = 0.0

    def _observe(self, call: AttentionCall) -> None:
        start = time.perf_counter()
        super()._observe(call)
        if call.query.is_cuda:
            torch.cuda.synchronize(call.query.device)
        self.seconds += time.perf_counter() - start


def credit_layers(n_layers: int, config: CreditConfig) -> list[int]:
    """The layers credit reads, plus the last one: ``rhythm`` infers the depth from the deepest."""
    return sorted({*sample_layers(n_layers, config.n_layers), n_layers - 1})


@dataclass
class PolicyPass:
    logp: Tensor | None  # [B, W] log-prob of each token in the last W positions (None if not asked)
    gamma: Tensor  # [B, W] credit multipliers, 1 off the response
    rhythms: list[Rhythm]  # one per sample; empty without credit
    credit_seconds: float  # statistics inside the forward + token sets and multipliers


def policy_pass(
    model: Any,
    rollout: Rollout,
    strategy: Strategy | None,
    credit: CreditConfig = DEFAULT_CREDIT,
    *,
    stats: StatsConfig = CREDIT_STATS,
    logprobs: bool = True,
    temperature: float = 1.0,
) -> PolicyPass:
    """One forward over ``rollout``: log-probs (with grad if enabled) and, for a ``strategy``, the
    credit multipliers from attention statistics captured in that same forward. Log-probs are
    those of the sampling distribution (logits / ``temperature``).

    FAI is restricted to rows from the earliest response start on; for every response token this
    equals restricting it to its own response, since all rows after a response token are response
    rows (the batch is left-padded, so no row follows a response).
    """
    b, w = len(rollout.prompt_lens), rollout.width
    inputs = dict(
        input_ids=rollout.ids.to(model.device),
        attention_mask=rollout.attention_mask.to(model.device),
        position_ids=rollout.position_ids.to(model.device),
        logits_to_keep=w + 1 if logprobs else 1,
    )
    cap = None
    if strategy is not None:
        n_layers = model.config.get_text_config().num_hidden_layers
        cap = _TimedCapture(
            model,
            config=stats,
            layers=credit_layers(n_layers, credit),
            fai_rows=(min(rollout.prompt_lens), rollout.ids.shape[1]),
        )
    with cap or nullcontext():
        logits = model(**inputs).logits
    logp = _token_logprobs(logits, rollout, temperature) if logprobs else None
    gamma = torch.ones(b, w)
    if cap is None:
        return PolicyPass(logp, gamma, [], 0.0)
    start = time.perf_counter()
    traces = cap.traces()  # one per sample, left padding dropped
    rhythms = [
        rhythm(_with_spans(traces[i], p, c), credit)
        for i, (p, c) in enumerate(zip(rollout.prompt_lens, rollout.completion_lens, strict=True))
    ]
    gamma[rollout.response_mask] = torch.cat([gammas(r, strategy, credit) for r in rhythms])
    return PolicyPass(logp, gamma, rhythms, cap.seconds + time.perf_counter() - start)


def _with_spans(trace: Trace, n_prompt: int, n_completion: int) -> Trace:
    if len(trace) != n_prompt + n_completion:
        raise ShapeError(
            f"captured {len(trace)} tokens for a prompt of {n_prompt} + completion of {n_completion}"
        )
    trace.spans = {"prompt": (0, n_prompt), "response": (n_prompt, n_prompt + n_completion)}
    return trace


def _token_logprobs(logits: Tensor, rollout: Rollout, temperature: float) -> Tensor:
    """log p(token) of the last W tokens from the logits of the last W + 1 positions. [B, W]."""
    w = rollout.width
    logits = logits[:, :-1].float() / temperature  # [B, W, V]: T-W-1+j predicts token T-W+j
    targets = rollout.ids[:, -w:].to(logits.device)  # [B, W]
    picked = logits.gather(-1, targets[..., None]).squeeze(-1)  # [B, W]
    return picked - logits.logsumexp(-1)


# -- trainer --------------------------------------------------------------------------------------
@dataclass
class Sample:
    """The first completion of a step, for plots: its tokens and their multipliers."""

    prompt: str
    tokens: list[str]
    gamma: list[float]
    reward: float


@dataclass
class StepLog:
    step: int
    reward: float  # mean reward of the sampled completions
    loss: float  # GRPO loss of the first optimisation pass
    boosted: float  # share of response tokens with gamma > 1
    credit_overhead_pct: float  # attention credit, in % of the whole step
    seconds: float  # the whole step: sampling, reward, forward/backward, optimiser
    sample: Sample = field(repr=False)


class GRPOTrainer:
    """``GRPOTrainer(model, tokenizer, reward_fn, config).step(prompts)`` -> ``StepLog``.

    ``reward_fn(prompts, completions)`` gets the decoded texts (completions without special
    tokens), one prompt per completion, and returns one float each.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        reward_fn: RewardFn,
        config: GRPOConfig = GRPOConfig(),
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.model, self.tokenizer, self.reward_fn, self.config = (
            model,
            tokenizer,
            reward_fn,
            config,
        )
        self.optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=config.lr)
        self.history: list[StepLog] = []

    def step(self, prompts: Sequence[str]) -> StepLog:
        cfg, start = self.config, time.perf_counter()
        prompt_ids, completion_ids = sample(self.model, self.tokenizer, prompts, cfg)
        texts = [p for p in prompts for _ in range(cfg.group_size)]
        decoded = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        rewards = torch.tensor([float(r) for r in self.reward_fn(texts, decoded)])  # [B]
        if rewards.shape != (len(texts),):
            raise ShapeError(
                f"reward_fn returned {rewards.numel()} rewards for {len(texts)} completions"
            )
        advantages = group_advantages(rewards, cfg.group_size)  # [B]
        rollout = pack(prompt_ids, completion_ids, pad_token_id(self.model, self.tokenizer))
        mask = rollout.response_mask  # [B, W]
        was_training = self.model.training
        self.model.train()
        try:
            first = policy_pass(
                self.model,
                rollout,
                cfg.strategy,
                cfg.credit,
                stats=cfg.stats,
                temperature=cfg.temperature,
            )
            assert first.logp is not None
            old_logp = first.logp.detach()  # on-policy: the first pass is the old policy
            loss = self._update(first.logp, old_logp, advantages, first.gamma, mask)
            for _ in range(cfg.iterations - 1):
                logp = policy_pass(self.model, rollout, None, temperature=cfg.temperature).logp
                assert logp is not None
                self._update(logp, old_logp, advantages, first.gamma, mask)
        finally:
            self.model.train(was_training)
        seconds = time.perf_counter() - start
        log = StepLog(
            step=len(self.history),
            reward=float(rewards.mean()),
            loss=loss,
            boosted=float((first.gamma[mask] > 1).float().mean()),
            credit_overhead_pct=100 * first.credit_seconds / seconds,
            seconds=seconds,
            sample=Sample(
                prompt=prompts[0],
                tokens=self.tokenizer.convert_ids_to_tokens(completion_ids[0].tolist()),
                gamma=first.gamma[0, mask[0]].tolist(),
                reward=float(rewards[0]),
            ),
        )
        self.history.append(log)
        return log

    def _update(
        self, logp: Tensor, old_logp: Tensor, advantages: Tensor, gamma: Tensor, mask: Tensor
    ) -> float:
        """One optimiser step on the GRPO loss; returns the loss."""
        dev, cfg = logp.device, self.config
        loss = grpo_loss(
            logp,
            old_logp,
            advantages.to(dev),
            gamma.to(dev),
            mask.to(dev),
            cfg.clip_eps,
            cfg.credit.sign,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def train(self, batches: Iterable[Sequence[str]], progress: bool = True) -> list[StepLog]:
        """One ``step`` per batch of prompts; the progress bar shows the latest step's log."""
        bar = tqdm(batches, desc="GRPO", unit="step", disable=not progress)
        logs = []
        for prompts in bar:
            log = self.step(prompts)
            bar.set_postfix(
                reward=f"{log.reward:.3f}",
                loss=f"{log.loss:.3f}",
                boosted=f"{log.boosted:.2f}",
                credit=f"{log.credit_overhead_pct:.1f}%",
            )
            logs.append(log)
        return logs
