"""Reproductions on SmolLM2-135M-Instruct reasoning traces: the preplan-and-anchor rhythm (Li et
al. 2025, Table 2 (a) and (b), the paper's figures beside ours), attention sinks and local / global
heads. The rhythm runs on the model's greedy answers to two-step arithmetic word problems
(``attnscope.findings.problems``) asked under its chat template; sinks and heads on the packaged
English paragraphs. One pass; the problems are spread over ``--shards`` processes (their samples
pooled before the comparison); writes a section of RESULTS.md and the rhythm figure of one trace.

    python benchmarks/reproduce_instruct.py [--problems 42] [--new-tokens 40] [--shards 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys

import torch

import attnscope as asc
from attnscope.findings import markdown, measure_heads, measure_sinks
from attnscope.findings.problems import TwoStepProblem, correct, two_step_problems
from attnscope.findings.rhythm import RhythmSample, compare_samples, rhythm_samples

sys.path.insert(0, str(Path(__file__).parent))
from harness import write_section

MODEL = "smollm2-135m-instruct"
SECTION = "Reproductions on SmolLM2-135M-Instruct reasoning traces (CPU)"
FIGURE = Path(__file__).parent / "figures" / "rhythm_instruct.html"


def child(index: int, shards: int, args: argparse.Namespace, out: Path) -> None:
    """Rhythm samples of every ``shards``-th problem from ``index`` on, as JSON."""
    lm = asc.load(MODEL)
    problems = two_step_problems(args.problems)[index::shards]
    samples, layers, skipped = rhythm_samples(lm, problems, args.new_tokens, chat=True)
    rows = [
        {
            "problem": [s.problem.question, s.problem.answer, list(s.problem.steps)],
            "response": s.response,
            **{f: getattr(s, f).tolist() for f in TENSORS},
        }
        for s in samples
    ]
    out.write_text(json.dumps({"samples": rows, "layers": layers, "skipped": skipped}))


TENSORS = ("waad", "fai", "entropy", "entropy_next", "greedy", "waad_peaks", "fai_peaks")


def pooled(files: list[Path], n_problems: int) -> tuple[list[RhythmSample], list[int], int]:
    """The shards' samples in problem order, their layers and the skipped count."""
    samples, layers, skipped = [], [], 0
    for part in (json.loads(f.read_text()) for f in files):
        layers, skipped = part["layers"] or layers, skipped + part["skipped"]
        for row in part["samples"]:
            question, answer, steps = row["problem"]
            samples.append(
                RhythmSample(
                    problem=TwoStepProblem(question, answer, tuple(steps)),
                    response=row["response"],
                    **{f: torch.tensor(row[f]) for f in TENSORS},
                )
            )
    order = [p.question for p in two_step_problems(n_problems)]
    samples.sort(key=lambda s: order.index(s.problem.question))
    return samples, layers, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problems", type=int, default=42, help="word problems (rhythm)")
    parser.add_argument("--new-tokens", type=int, default=40, help="greedy tokens per answer")
    parser.add_argument("--sink-texts", type=int, default=32)
    parser.add_argument("--head-texts", type=int, default=16)
    parser.add_argument("--shuffles", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--shards", type=int, default=2, help="processes for the rhythm")
    parser.add_argument("--child", nargs=3, metavar=("INDEX", "SHARDS", "OUT"))
    parser.add_argument("--no-write", action="store_true", help="print only (no RESULTS.md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        index, shards, out = args.child
        child(int(index), int(shards), args, Path(out))
        return
    load = [os.getloadavg()[0]]
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="reproduce_instruct-"))
    files = [tmp / f"shard-{i}.json" for i in range(args.shards)]
    forwarded = [f"--problems={args.problems}", f"--new-tokens={args.new_tokens}"]
    forwarded.append(f"--threads={args.threads}")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *forwarded, "--child", str(i), str(args.shards), str(f)]
        )
        for i, f in enumerate(files)
    ]
    lm = asc.load(MODEL)
    seconds = {"load": time.perf_counter() - start}
    t = time.perf_counter()
    sinks = measure_sinks(lm, args.sink_texts)
    seconds["sinks"] = time.perf_counter() - t
    t = time.perf_counter()
    heads = measure_heads(lm, args.head_texts)
    seconds["heads"] = time.perf_counter() - t
    if any(proc.wait() for proc in procs):
        raise SystemExit(f"a rhythm shard failed (see its output above; files in {tmp})")
    seconds["rhythm, all shards from the start"] = time.perf_counter() - start
    samples, layers, skipped = pooled(files, args.problems)
    rhythm = compare_samples(
        MODEL,
        samples,
        layers,
        skipped,
        chat=True,
        n_new=args.new_tokens,
        n_shuffles=args.shuffles,
        seconds=seconds["rhythm, all shards from the start"],
    )
    load.append(os.getloadavg()[0])
    FIGURE.parent.mkdir(exist_ok=True)
    rhythm.figure(0).write_html(FIGURE, include_plotlyjs="cdn")
    solved = sum(correct(s.problem, s.response) for s in rhythm.samples)
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    note = (
        f"{MODEL} (GGUF Q4_1 de-quantized to float32, SDPA), {args.shards} rhythm processes "
        f"beside one for sinks and heads, torch threads = {args.threads} each; "
        f"{timing}; 1-minute load average {load[0]:.1f} at the start and {load[1]:.1f} at the "
        f"end on {os.cpu_count()} cores (shared machine). Traces: greedy answers (up to "
        f"{args.new_tokens} tokens, ending at the end-of-turn token) to {args.problems} two-step "
        "arithmetic word problems asked as user turns under the model's chat template (the "
        "templated prompt is the `prompt` span); the last number of the answer is right in "
        f"{solved}/{len(rhythm.samples)} of the measured traces. Peak = local maximum above the "
        f"response's {rhythm.quantile:.0%} quantile (`attnscope.findings.rhythm.peaks`); (b) "
        f"counts a WAAD peak within {rhythm.k} tokens before an FAI peak or at it; random = as "
        f"many positions per response, uniform, {args.shuffles} draws; lift = (observed - "
        "random) / random. The paper's figures are Qwen3-4B-Base on GSM8K (70 problems); "
        "the receiver-head row is not measured here. Figure of one trace: "
        f"`{FIGURE.relative_to(Path(__file__).parent.parent)}`."
    )
    verdicts = "\n".join(
        f"- {name}: {r.verdict()}"
        for name, r in (("rhythm", rhythm), ("sinks", sinks), ("heads", heads))
    )
    body = (
        f"{note}\n\nRhythm, Table 2 of Li et al. 2025 beside ours:\n\n{rhythm.table2()}\n\n"
        f"Agreement with the papers:\n\n{verdicts}\n\n"
        + markdown([rhythm.row(), sinks.row(), heads.row()])
    )
    print(body)
    if not args.no_write:
        write_section(SECTION, "python benchmarks/reproduce_instruct.py", body)


if __name__ == "__main__":
    main()
