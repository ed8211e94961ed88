"""Measurement harness shared by the benchmarks (BENCHMARKS.md).

Each configuration runs in a fresh subprocess: a setup (model load, inputs), one warm-up, then N
timed repetitions. Peak memory is the increase of RSS, sampled every 10 ms, over the baseline taken
after setup. The child prints one JSON line; the parent alternates sides and prints ratios.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

RESULTS = Path(__file__).with_name("RESULTS.md")


class PeakRSS:
    """Samples this process's RSS every 10 ms in a thread; ``peak`` is the maximum seen."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def page_in(model) -> None:
    """Touch every weight so memory-mapped safetensors pages count in the baseline RSS, not in
    the first measured run."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.sum()


def measure(work: Callable[[], object], reps: int) -> dict:
    """Warm up once, then time ``reps`` runs; report times, net peak RSS and the last result."""
    import gc

    gc.collect()
    base = psutil.Process().memory_info().rss  # after setup (model, inputs), before any work
    times = []
    with PeakRSS() as rss:
        result = work()  # warm-up
        for _ in range(reps):
            start = time.perf_counter()
            result = work()
            times.append(time.perf_counter() - start)
    return {"times": times, "peak_mb": (rss.peak - base) / 2**20, "result": result}


def run_child(script: str, args: list[str]) -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter and parse its last JSON line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, script, "--child", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_rel_diff(ours: dict, ref: dict) -> float:
    """Largest |a - b| / max(1, |b|) over all metrics; NaN patterns must agree (else inf)."""
    worst = 0.0
    for name, b in ref.items():
        a = ours[name]
        if not bool((a.isnan() == b.isnan()).all()):
            return float("inf")
        worst = max(worst, float(((a - b).abs() / b.abs().clamp_min(1)).nan_to_num().max()))
    return worst


def summary(times: list[float]) -> tuple[float, float, float]:
    return statistics.median(times), min(times), max(times)


def fmt_time(times: list[float]) -> str:
    med, lo, hi = summary(times)
    return f"{med:.3f} s ({lo:.3f}-{hi:.3f})"


def ratio(ours: list[float], peer: list[float]) -> str:
    """peer / ours, claimed only when the spreads do not overlap."""
    m_o, lo_o, hi_o = summary(ours)
    m_p, lo_p, hi_p = summary(peer)
    overlap = not (hi_o < lo_p or hi_p < lo_o)
    return f"{m_p / m_o:.2f}x" + (" (spreads overlap)" if overlap else "")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def write_section(name: str, command: str, body: str) -> None:
    """Replace the section ``name`` of RESULTS.md (between markers) with a dated table."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamp = datetime.date.today().isoformat()
    block = f"{start}\n## {name}\n\n{stamp} on {machine()}.\nCommand: `{command}`\n\n{body}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
