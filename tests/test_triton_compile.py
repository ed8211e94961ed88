"""The scripts for a GPU machine, run on one without. benchmarks/triton_compile.py (in a
subprocess, TRITON_INTERPRET unset) compiles every variant of ``launch.VARIANTS`` (the fused
forward's too) to real cubin for sm_80 and sm_90 with every launch configuration the CUDA
autotuner may pick: within the target's shared memory and without register spills. About
3 minutes on 2 idle cores the first time; the Triton cache (~/.cache/attnscope/triton)
brings reruns to seconds. benchmarks/gpu_check.py runs to the end on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnscope.kernels.launch import CONFIGS, SHARED_MEMORY, VARIANTS

pytest.importorskip("triton")
SCRIPT = Path(__file__).parents[1] / "benchmarks" / "triton_compile.py"


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("compile") / "records.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    problems = [line for line in proc.stdout.splitlines() if line.startswith("PROBLEM")]
    assert proc.returncode == 0, "\n".join(problems) or proc.stderr[-3000:]
    assert "0 problem(s)" in proc.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_variant_compiles_for_both_targets(records):
    compiled = {(name, r["kernel"], r["target"]) for r in records for name in r["variants"]}
    for variant in VARIANTS:
        for target in SHARED_MEMORY:
            for kernel in ("fused" if variant.value else "row", "col"):
                assert (variant.name, kernel, target) in compiled, (variant.name, kernel, target)
    assert not [r for r in records if "error" in r]


@pytest.mark.slow
def test_within_shared_memory_without_spills(records):
    for r in records:
        where = f"{r['variants'][0]} {r['kernel']} {r['config']} sm_{r['target']}"
        assert 0 < r["shared"] <= SHARED_MEMORY[r["target"]], where
        assert 0 < r["registers"] <= 255, where
        assert r["stack"] == 0 and r["local"] == 0, f"{where}: register spills"


@pytest.mark.slow
def test_every_table_entry_is_compiled(records):
    """No launch configuration in the table goes unchecked: each is compiled for each target
    (for the head dim and precision it serves)."""
    seen = {
        (r["kernel"], r["dtype"] == "float32", r["head_dim"], r["config"], r["target"])
        for r in records
    }
    for (kind, table), by_dim in CONFIGS.items():
        for dim, configs in by_dim.items():
            for cfg in configs:
                for target in SHARED_MEMORY:
                    key = (kind, table == "fp32", dim, cfg.label(), target)
                    assert key in seen, key


@pytest.mark.slow
def test_gpu_check_runs_to_the_end_without_a_gpu():
    """benchmarks/gpu_check.py on the CPU (--quick): every step runs the code it runs on CUDA in
    the interpreter, or says why it is skipped, and the summary reports no failure."""
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, check=False
    )
    summary = proc.stdout[proc.stdout.rindex("SUMMARY") :]
    assert proc.returncode == 0, summary + proc.stderr[-3000:]
    assert "gpu_check: 0 step(s) failed" in summary
    for step in ("variants", "capture", "fused", "table"):
        assert f"\n{step}" in summary and " ok " in summary.split(f"\n{step}")[1].split("\n")[0]
    if "SUMMARY (no CUDA)" in summary:
        assert "compile   skipped" in summary
