"""``attnscope rl-demo``: GRPO with coupled attention credit against plain GRPO on a toy task."""

from __future__ import annotations

import argparse

from attnscope.rl.demo import marked, run_demo


def run(args: argparse.Namespace) -> int:
    result = run_demo(args.out, steps=args.steps, warmup_steps=args.warmup, seed=args.seed)
    window = max(1, min(20, args.steps // 4))
    for arm, logs in result.history.items():
        overhead = sorted(log.credit_overhead_pct for log in logs)[len(logs) // 2]
        print(
            f"{arm:>8}: reward {result.mean_reward(arm, first=window):.3f} (first {window} steps)"
            f" -> {result.mean_reward(arm, last=window):.3f} (last {window}),"
            f" median credit overhead {overhead:.1f}% of a step"
        )
    sample = result.history["coupled"][-1].sample
    print(
        f"boosted tokens of a sample (prompt {sample.prompt!r}):",
        marked(sample.tokens, sample.gamma),
    )
    print(f"log:  {result.log.resolve()}")
    print(f"plot: {result.plot.resolve()}")
    return 0
