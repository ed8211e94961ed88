"""Attention-credit overhead as a share of a GRPO step on CPU (attnscope.rl.grpo).

Each model runs in a fresh subprocess. With the learning rate at 0 the policy never changes, so
re-seeding before every step gives both arms the same samples: steps alternate between coupled
credit and plain GRPO (one forward + backward each; coupled captures statistics in that forward).
Two figures per model: the credit time measured inside the step (statistics during the forward,
token sets and multipliers) in % of the step, and the step-time difference coupled - plain.

    python benchmarks/rl_overhead.py [--models gemma3-270m demo-policy] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import fmt_time, run_child, write_section

ANSWERS = {"Question: 17 + 25 = ?\nAnswer:": "42", "Question: 8 + 34 = ?\nAnswer:": "42"}


def arithmetic_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1 when the completion contains the answer."""
    return [float(ANSWERS[p] in c) for p, c in zip(prompts, completions, strict=True)]


def setup(model: str):
    """(policy, tokenizer, reward, prompts, config) for one benchmarked model."""
    from attnscope.rl import demo
    from attnscope.rl.grpo import GRPOConfig

    if model == "demo-policy":
        tok = demo.char_tokenizer()
        prompts = list(demo.DIGITS[:8])
        return demo.tiny_policy(tok), tok, demo.prefix_reward, prompts, demo.CONFIG
    import attnscope as asc

    lm = asc.load(model)
    config = GRPOConfig(group_size=4, max_new_tokens=48)
    return lm.model, lm.tokenizer, arithmetic_reward, list(ANSWERS), config


def child(model: str, reps: int, out: str) -> None:
    from attnscope.rl.grpo import GRPOTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    policy, tok, reward, prompts, config = setup(model)
    arms = {
        arm: GRPOTrainer(policy, tok, reward, replace(config, strategy=strategy, lr=0.0))
        for arm, strategy in (("coupled", "coupled"), ("plain", None))
    }
    result: dict = {"coupled": [], "plain": [], "credit": []}
    result["batch"] = (
        f"{len(prompts)} prompts x {config.group_size}, <= {config.max_new_tokens} new tokens"
    )
    for rep in range(reps + 1):  # the first round is a warm-up
        for arm, trainer in arms.items():
            torch.manual_seed(rep)
            start = time.perf_counter()
            log = trainer.step(prompts)
            seconds = time.perf_counter() - start
            if rep == 0:
                continue
            result[arm].append(seconds)
            if arm == "coupled":
                result["credit"].append(log.credit_overhead_pct * log.seconds / 100)
    Path(out).write_text(json.dumps(result))
    print(json.dumps({"ok": True}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "demo-policy"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "REPS", "OUT"))
    args = parser.parse_args()
    if args.child:
        model, reps, out = args.child
        child(model, int(reps), out)
        return
    rows = [
        "| model | batch | coupled step | plain step | credit inside the step | credit share "
        "(in-step timing) | coupled - plain |",
        "|---|---|---|---|---|---|---|",
    ]
    tmp = Path(tempfile.mkdtemp())
    load = [os.getloadavg()[0]]
    for model in args.models:
        out = tmp / f"{model}.json"
        run_child(__file__, [model, str(args.reps), str(out)])
        r = json.loads(out.read_text())
        share = statistics.median(
            100 * c / s for c, s in zip(r["credit"], r["coupled"], strict=True)
        )
        diff = statistics.median(
            100 * (c - p) / c for c, p in zip(r["coupled"], r["plain"], strict=True)
        )
        line = (
            f"| {model} | {r['batch']} | {fmt_time(r['coupled'])} | {fmt_time(r['plain'])} | "
            f"{fmt_time(r['credit'])} | {share:.1f}% | {diff:+.1f}% |"
        )
        print(line, flush=True)
        rows.append(line)
        load.append(os.getloadavg()[0])
    note = (
        f"One GRPO step = sample the group completions, score them, one forward + backward over "
        f"prompt + completion, one AdamW step (no KL, mu = 1). `coupled` captures waad, "
        f"mean_distance, entropy and fai on the credit layers (5 of the middle third + the last) "
        f"inside that forward; `plain` runs the same step without capture. Learning rate 0 and a "
        f"seed per round give both arms identical samples; arms alternate, {args.reps} rounds "
        f"after a warm-up, median (min-max). Credit share: time inside capture's statistics plus "
        f"the token sets and multipliers, measured within each coupled step, in % of that step "
        f"(median over steps). coupled - plain: difference of step times in % of the coupled "
        f"step (median over rounds; noisier). torch threads = {os.cpu_count()}; 1-minute load "
        f"average at the start and after each model: {', '.join(f'{x:.1f}' for x in load)} (other "
        f"processes share the machine when it exceeds the core count). The published "
        f"figure for a separate eager pass is 2-3% of a step on GPUs."
    )
    table = "\n".join(rows)
    print(table)
    write_section(
        "Attention-credit overhead in GRPO (CPU)",
        "python benchmarks/rl_overhead.py",
        note + "\n\n" + table,
    )


if __name__ == "__main__":
    main()
