"""``attnscope rl-demo``: coupled attention credit vs plain GRPO on a verifiable toy task, on CPU.

Task: the prompt is one digit d; the answer counts on from it, ``N_DIGITS`` digits modulo 10
(``7`` -> ``89012...``). Reward: the length of the correct prefix / ``N_DIGITS`` (an early slip
costs everything after it). The policy is a tiny Llama over a 13-token character vocabulary,
briefly warmed up with supervised steps so that it starts at a low but non-zero reward; then both
arms train from the same weights with the same samples' random seed. The defaults (30 steps of
4 prompts x 8 completions per arm) finish in about a minute on 2 CPU cores and lift the reward from
about 0.15 to about 0.3 in both arms.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from attnscope.rl.grpo import GRPOConfig, GRPOTrainer, StepLog

N_DIGITS = 20
DIGITS = "0123456789"
SPECIALS = ("<pad>", "<s>", "</s>")
ARMS = {"coupled": "coupled", "plain": None}  # arm name -> credit strategy
CONFIG = GRPOConfig(group_size=8, max_new_tokens=N_DIGITS + 1, lr=1e-3)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per digit, plus pad / bos / eos."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, *DIGITS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def target(prompt: str) -> str:
    """The correct answer: ``N_DIGITS`` digits counting on from the prompt's digit."""
    d = int(prompt)
    return "".join(DIGITS[(d + i) % 10] for i in range(1, N_DIGITS + 1))


def prefix_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Share of the answer that is correct before the first wrong (or missing) digit."""
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        correct = 0
        for got, want in zip(completion, target(prompt), strict=False):
            if got != want:
                break
            correct += 1
        rewards.append(correct / N_DIGITS)
    return rewards


def tiny_policy(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A Llama of the tiny-llama test size: 2 layers, 4 query / 2 KV heads, d 64."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def warm_up(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, steps: int, rng: random.Random
) -> float:
    """``steps`` supervised steps on correct answers (batch 32); returns the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss = torch.tensor(float("nan"))
    model.train()
    for _ in range(steps):
        prompts = [rng.choice(DIGITS) for _ in range(32)]
        ids = torch.tensor(
            [[*tokenizer(p + target(p)).input_ids, tokenizer.eos_token_id] for p in prompts]
        )  # [32, 1 + N_DIGITS + 1]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def prompt_batches(rng: random.Random, steps: int, size: int) -> Iterator[list[str]]:
    for _ in range(steps):
        yield [rng.choice(DIGITS) for _ in range(size)]


@dataclass
class DemoResult:
    history: dict[str, list[StepLog]]  # arm -> one log per step
    log: Path  # JSON lines: one per arm and step
    plot: Path  # plotly HTML: reward curves and the boosted tokens of a sample

    def mean_reward(self, arm: str, first: int | None = None, last: int | None = None) -> float:
        """Mean reward of an arm over its first or last steps (all steps if neither)."""
        logs = self.history[arm]
        logs = logs[:first] if first else logs[-last:] if last else logs
        return sum(log.reward for log in logs) / len(logs)


def run_demo(
    out: str | Path = "rl-demo",
    steps: int = 30,
    warmup_steps: int = 15,
    prompts_per_step: int = 4,
    config: GRPOConfig = CONFIG,
    seed: int = 0,
    progress: bool = True,
) -> DemoResult:
    """Warm up one tiny policy, then train a copy per arm (coupled credit, plain GRPO), each
    behind a progress bar ``GRPO ARM`` of ``steps`` steps."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    base = tiny_policy(tokenizer)
    warm_up(base, tokenizer, warmup_steps, random.Random(seed))
    history: dict[str, list[StepLog]] = {}
    for arm, strategy in ARMS.items():
        model = copy.deepcopy(base)
        torch.manual_seed(seed + 1)  # the same sampling noise for both arms
        trainer = GRPOTrainer(model, tokenizer, prefix_reward, replace(config, strategy=strategy))
        batches = tqdm(
            prompt_batches(random.Random(seed + 1), steps, prompts_per_step),
            total=steps,
            desc=f"GRPO {arm}",
            unit="step",
            disable=not progress,
        )
        history[arm] = trainer.train(batches, progress=False)
    log = out / "rl_demo_log.jsonl"
    with log.open("w") as f:
        for arm, logs in history.items():
            for entry in logs:
                row = {k: v for k, v in asdict(entry).items() if k != "sample"}
                f.write(json.dumps({"arm": arm, **row}) + "\n")
    plot = out / "rl_demo.html"
    figure(history).write_html(plot, include_plotlyjs=True)
    return DemoResult(history, log, plot)


def figure(history: dict[str, list[StepLog]], smooth: int = 10) -> go.Figure:
    """Reward per step of each arm (moving average of ``smooth`` steps) and the coupled arm's last
    sample, one bar per token at its credit multiplier."""
    fig = make_subplots(
        rows=2,
        cols=1,
        subplot_titles=("mean reward per GRPO step", "boosted tokens of a sample (coupled arm)"),
        vertical_spacing=0.15,
    )
    for arm, logs in history.items():
        rewards = torch.tensor([log.reward for log in logs])
        kernel = min(smooth, len(logs))
        avg = rewards.unfold(0, kernel, 1).mean(-1)  # [steps - kernel + 1]
        fig.add_scatter(y=rewards.tolist(), name=f"{arm} (per step)", opacity=0.3, row=1, col=1)
        fig.add_scatter(
            x=list(range(kernel - 1, len(logs))),
            y=avg.tolist(),
            name=f"{arm} ({kernel}-step mean)",
            row=1,
            col=1,
        )
    sample = history["coupled"][-1].sample
    fig.add_bar(
        x=[f"{i}:{t}" for i, t in enumerate(sample.tokens)],
        y=sample.gamma,
        marker_color=["crimson" if g > 1 else "lightgray" for g in sample.gamma],
        name=f"gamma (prompt {sample.prompt!r}, reward {sample.reward:.2f})",
        row=2,
        col=1,
    )
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_yaxes(title_text="reward", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="gamma", row=2, col=1)
    fig.update_layout(height=700, title="attnscope rl-demo: coupled attention credit vs plain GRPO")
    return fig


def marked(tokens: list[str], gamma: list[float]) -> str:
    """Tokens with the boosted ones in brackets: ``3 [4] 5``."""
    return " ".join(f"[{t}]" if g > 1 else t for t, g in zip(tokens, gamma, strict=True))
