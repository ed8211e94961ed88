"""GRPO with coupled attention credit vs plain GRPO on a real instruct policy (CPU).

Policy: SmolLM2-135M-Instruct (alias ``smollm2-135m-instruct``), full fine-tune, AdamW. Task:
two-step arithmetic word problems (``attnscope.findings.problems``: templates 0-4, starting
amounts up to 12) under the chat template; reward 0.5 for writing the first step's result + 0.5
when the completion's last number is the answer (``attnscope.rl.arithmetic``). Each
(arm, seed) trains from the same weights in a fresh subprocess; for a seed both arms draw the same
prompt batches and start from the same sampling seed (their samples diverge once the weights do).
Held-out accuracy: greedy answers to problems of another seed, before (``base`` job) and after
training. Writes a plotly figure (mean training reward per step, band = min-max over seeds) to
benchmarks/figures/rl_real.html and a section of RESULTS.md.

    python benchmarks/rl_real.py [--seeds 0 1 2] [--steps 4] [--prompts 1] [--group 6] [--jobs 3]

The defaults fit a shared 2-core machine (about an hour); raise --steps, --prompts and --group
where more compute is at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import write_section

MODEL = "smollm2-135m-instruct"
ARMS = {"coupled": "coupled", "plain": None}
FIGURE = Path(__file__).parent / "figures" / "rl_real.html"
TRAIN_SEED, EVAL_SEED = 1000, 999  # problem sets: the training pool and the held-out problems
KINDS = (0, 1, 2, 3, 4)  # templates without division


def child(arm: str, seed: int, args: argparse.Namespace, out: Path) -> None:
    """Train one arm for one seed (``base``: evaluate the untrained policy only); write JSON."""
    import torch

    import attnscope as asc
    from attnscope.findings.problems import two_step_problems
    from attnscope.rl import GRPOConfig, GRPOTrainer
    from attnscope.rl.arithmetic import ArithmeticTask

    torch.set_num_threads(args.threads)
    lm = asc.load(MODEL)
    model, tok = lm.model, lm.tokenizer
    problems = partial(two_step_problems, kinds=KINDS, max_start=args.max_start)
    held_out = ArithmeticTask(tok, problems(args.eval_problems, EVAL_SEED))
    result: dict = {"arm": arm, "seed": seed, "steps": []}
    if arm == "base":
        result["accuracy"] = held_out.accuracy(model, tok, args.max_new_tokens)
        out.write_text(json.dumps(result))
        return
    task = ArithmeticTask(tok, problems(args.pool, TRAIN_SEED))
    config = GRPOConfig(
        group_size=args.group,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        lr=args.lr,
        strategy=ARMS[arm],
    )
    torch.manual_seed(seed)
    trainer = GRPOTrainer(model, tok, task.reward, config)
    for prompts in task.batches(args.steps, args.prompts, seed):
        log = trainer.step(prompts)
        result["steps"].append({k: v for k, v in asdict(log).items() if k != "sample"})
        print(json.dumps(result["steps"][-1]), file=sys.stderr, flush=True)
    result["accuracy"] = held_out.accuracy(model, tok, args.max_new_tokens)
    out.write_text(json.dumps(result))


def run_jobs(jobs: list[tuple[str, int]], args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Each (arm, seed) in its own interpreter, ``args.jobs`` at a time."""

    def one(job: tuple[str, int]) -> dict:
        arm, seed = job
        out = tmp / f"{arm}-{seed}.json"
        cmd = [sys.executable, __file__, "--child", arm, str(seed), str(out), *forwarded(args)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        with (tmp / f"{arm}-{seed}.log").open("w") as log:
            proc = subprocess.run(cmd, stderr=log, stdout=log, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{arm} seed {seed} failed, see {tmp / f'{arm}-{seed}.log'}")
        print(f"done: {arm} seed {seed}", flush=True)
        return json.loads(out.read_text())

    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(one, jobs))


SIZES = (
    "steps",
    "prompts",
    "group",
    "max_new_tokens",
    "pool",
    "eval_problems",
    "threads",
    "max_start",
)


def forwarded(args: argparse.Namespace) -> list[str]:
    flags = [f"--{n.replace('_', '-')}={getattr(args, n)}" for n in SIZES]
    return [*flags, f"--lr={args.lr}", f"--temperature={args.temperature}"]


def figure(results: list[dict]):
    """Mean training reward per step of each arm over seeds, band = min-max over seeds."""
    import plotly.graph_objects as go

    fig = go.Figure()
    colors = {"coupled": "crimson", "plain": "steelblue"}
    fills = {"coupled": "rgba(220,20,60,0.15)", "plain": "rgba(70,130,180,0.15)"}
    for arm in ARMS:
        curves = [[s["reward"] for s in r["steps"]] for r in results if r["arm"] == arm]
        steps = list(range(1, len(curves[0]) + 1))
        per_step = list(zip(*curves, strict=True))
        lo, hi = [min(v) for v in per_step], [max(v) for v in per_step]
        fig.add_scatter(x=steps + steps[::-1], y=hi + lo[::-1], fill="toself",
                        fillcolor=fills[arm], line_width=0, name=f"{arm}: min-max over seeds",
                        hoverinfo="skip")  # fmt: skip
        fig.add_scatter(x=steps, y=[statistics.mean(v) for v in per_step], name=f"{arm}: mean",
                        line_color=colors[arm])  # fmt: skip
    fig.update_layout(
        title=f"GRPO on {MODEL}, two-step arithmetic: coupled attention credit vs plain "
        f"({len(curves)} seeds per arm)",
        xaxis_title="GRPO step",
        yaxis_title="mean reward of the step's samples",
        yaxis_range=[0, 1],
    )
    return fig


def table(results: list[dict], base: float, args: argparse.Namespace) -> str:
    k = max(1, args.steps // 4)
    rows = [
        f"| arm | seeds | reward, first {k} steps | reward, last {k} steps | held-out greedy "
        "accuracy (base: {:.0%}) | credit share of the step | step time |".format(base),
        "|---|---|---|---|---|---|---|",
    ]

    def spread(values: list[float], pct: bool = True) -> str:
        f = (lambda v: f"{100 * v:.0f}%") if pct else (lambda v: f"{v:.2f}")
        return f"{f(statistics.mean(values))} ({f(min(values))}-{f(max(values))})"

    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        first = [statistics.mean(s["reward"] for s in r["steps"][:k]) for r in runs]
        last = [statistics.mean(s["reward"] for s in r["steps"][-k:]) for r in runs]
        share = [s["credit_overhead_pct"] for r in runs for s in r["steps"]]
        secs = [s["seconds"] for r in runs for s in r["steps"]]
        rows.append(
            f"| {arm} | {len(runs)} | {spread(first)} | {spread(last)} | "
            f"{spread([r['accuracy'] for r in runs])} | "
            + (f"{statistics.median(share):.1f}% ({min(share):.1f}-{max(share):.1f}%)" if
               arm == "coupled" else "-")
            + f" | {statistics.median(secs):.0f} s ({min(secs):.0f}-{max(secs):.0f}) |"
        )  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps per run")
    parser.add_argument("--max-start", type=int, default=12, help="largest starting amount")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per step")
    parser.add_argument("--group", type=int, default=6, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--pool", type=int, default=240, help="training problems")
    parser.add_argument("--eval-problems", type=int, default=8, help="held-out problems")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--jobs", type=int, default=3, help="runs at a time")
    parser.add_argument("--no-write", action="store_true", help="print only (no RESULTS.md)")
    parser.add_argument("--child", nargs=3, metavar=("ARM", "SEED", "OUT"))
    args = parser.parse_args()
    if args.child:
        arm, seed, out = args.child
        child(arm, int(seed), args, Path(out))
        return
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="rl_real-"))
    print(f"logs in {tmp}", flush=True)
    jobs = [("base", 0)] + [(arm, seed) for seed in args.seeds for arm in ARMS]
    results = run_jobs(jobs, args, tmp)
    base = results[0]["accuracy"]
    runs = results[1:]
    FIGURE.parent.mkdir(exist_ok=True)
    figure(runs).write_html(FIGURE, include_plotlyjs="cdn")
    body = table(runs, base, args)
    print(body)
    minutes = (time.perf_counter() - start) / 60
    note = (
        f"{MODEL}, full fine-tune (AdamW, lr {args.lr}, no KL, mu = 1), {args.steps} GRPO steps "
        f"of {args.prompts} prompts x {args.group} completions (temperature {args.temperature}, "
        f"<= {args.max_new_tokens} new tokens) per run, seeds {args.seeds}; task: two-step "
        f"arithmetic word problems (templates {KINDS}, starting amounts up to {args.max_start}) "
        f"under the chat template ({args.pool} training problems); reward 0.5 for writing the "
        "first step's result + 0.5 when the last number of the completion is the answer. "
        "Coupled: credit "
        "multipliers from the attention rhythm captured in the training forward (gamma_amp 1.5, "
        "alpha 0.5); plain: every gamma = 1. Reward columns: mean over seeds of each run's mean "
        "training reward over those steps (min-max over seeds). Held-out accuracy: last number "
        "= answer, greedy, "
        f"{args.eval_problems} problems of another seed, after training (base: before). Credit "
        "share: time in the statistics, token sets and multipliers inside each coupled step, in "
        f"% of that step, median (min-max) over all steps. {args.jobs} runs at a time, "
        f"{args.threads} torch thread each, on a shared machine; {minutes:.0f} min in all. "
        f"Figure: `{FIGURE.relative_to(Path(__file__).parent.parent)}` (band = min-max over "
        "seeds). For a seed both arms draw the same samples until their weights differ enough "
        "to change them: equal rewards per step mean the policies have not diverged yet. No "
        "benefit is claimed unless the spreads separate."
    )
    if not args.no_write:
        write_section(
            "GRPO with attention credit on SmolLM2-135M-Instruct (CPU)",
            "python benchmarks/rl_real.py",
            note + "\n\n" + body,
        )


if __name__ == "__main__":
    main()
