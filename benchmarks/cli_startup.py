"""Start-up time of the `attnscope` command: `--help`, `models` and `query` on a small runs directory.

    python benchmarks/cli_startup.py [RUNS]

Each command runs as a fresh process after one untimed warm-up, 5 times; prints the median and
the spread (min-max) and writes the section "CLI start-up" of RESULTS.md. Without RUNS, a one-run
directory is written first with `attnscope analyze --model tiny-gpt2`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import fmt_time, write_section

ATTNSCOPE = Path(sys.executable).with_name("attnscope")  # the console script of this environment
REPS = 5
QUERY = "SELECT count(*) FROM stats"


def attnscope(args: list[str]) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run([str(ATTNSCOPE), *args], env=env, check=True, capture_output=True)


def timed(args: list[str]) -> list[float]:
    """Wall-clock seconds of ``attnscope ARGS`` in fresh processes: one warm-up, then REPS."""
    attnscope(args)
    times = []
    for _ in range(REPS):
        start = time.perf_counter()
        attnscope(args)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="?", help="runs directory to query (default: a tiny run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs
        if runs is None:
            runs = str(Path(tmp) / "runs")
            attnscope(
                ["analyze", "--model", "tiny-gpt2", "--prompt", "a b c", "--out", f"{runs}/r"]
            )
        rows = []
        load = [os.getloadavg()[0]]
        for shown, argv in [
            ("attnscope --help", ["--help"]),
            ("attnscope models", ["models"]),
            (f'attnscope query RUNS "{QUERY}"', ["query", runs, QUERY]),
        ]:
            line = f"| `{shown}` | {fmt_time(timed(argv))} |"
            print(line, flush=True)
            rows.append(line)
            load.append(os.getloadavg()[0])
    note = (
        f"Wall-clock time of a fresh `attnscope` process (console script), median of {REPS} after "
        "one warm-up (min-max); RUNS holds one tiny-gpt2 run. 1-minute load average at the start "
        f"and after each command: {', '.join(f'{x:.1f}' for x in load)} (other processes share "
        "the machine when it exceeds the core count)."
    )
    table = "| command | time |\n|---|---|\n" + "\n".join(rows)
    write_section("CLI start-up", "python benchmarks/cli_startup.py", note + "\n\n" + table)


if __name__ == "__main__":
    main()
