"""Compile every Triton kernel variant for sm_80 and sm_90 on a machine without a GPU.

For each variant of ``attnscope.kernels.launch.VARIANTS`` the script builds the request on the
CPU, takes the launches ``triton_stats`` would run (``plan``; with the variant's value for the
fused forward, whose row pass accumulates P @ V) and compiles each kernel with every launch
configuration the CUDA autotuner may pick, exactly as a CUDA launch would (same argument
specialisation), to real cubin. It reports shared memory (``compiled.metadata.shared``),
registers and stack bytes per thread (``cuobjdump -res-usage`` on the cubin: ptxas spills
registers to the stack frame, so stack 0 means no spills) and fails on more shared memory than
the target has or any spill. Each target (or shard) compiles in its own process with
TRITON_INTERPRET unset; TRITON_CACHE_DIR defaults to ~/.cache/attnscope/triton so reruns take
seconds. On a GPU machine, ``--targets 90`` (one process per core) fills the cache before the
GPU check.

    python benchmarks/triton_compile.py [--targets 80 90] [--shards N] [--variants covering|gpu]
                                        [--only GLOB ...] [--json OUT] [--write]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LENGTH = 1024  # tokens of the compiled calls: a multiple of 16, like the benchmark lengths
CACHE = Path.home() / ".cache" / "attnscope" / "triton"
SECTION = "Triton kernels compiled for sm_80 / sm_90 (no GPU)"


def child_env() -> dict[str, str]:
    """The environment of a compiling process: no interpreter, a stable cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(CACHE))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
    return env


def bind(launch: Any, cfg: Any, capability: int) -> tuple[Any, ...]:
    """Target, backend, keyword arguments and the argument specialisation (types, alignment,
    ints equal to 1) of ``launch`` with ``cfg``, from the binder ``JITFunction.run`` uses."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.constexprs(cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    kwargs.update(
        debug=kernel.debug or triton.knobs.runtime.debug,
        instrumentation_mode=triton.knobs.compilation.instrumentation_mode,
        fpsan_homomorphic_casts=triton.knobs.compilation.fpsan_homomorphic_casts,
    )
    bound, specialization, options = binder(*launch.args, **kwargs)
    return target, backend, kwargs, bound, specialization, options


def jobs(variant_set: str, only: list[str]) -> list[tuple[list[str], Any, Any]]:
    """Distinct compiles over the variants (``VARIANTS``, or with ``gpu`` ``GPU_VARIANTS``; with
    ``only``, those whose name matches one of its globs): ([variant names], launch, tile config);
    two launches are the same compile when their argument specialisations and configs agree (the
    first variant's launch stands for the others)."""
    import importlib

    from attnscope.kernels.launch import GPU_VARIANTS, VARIANTS
    from attnscope.kernels.request import build_request

    triton_stats = importlib.import_module("attnscope.kernels.triton_stats")
    assert not triton_stats.INTERPRET, "compile with TRITON_INTERPRET unset"
    found: dict[tuple, tuple[list[str], Any, Any]] = {}
    for variant in GPU_VARIANTS if variant_set == "gpu" else VARIANTS:
        if only and not any(fnmatch.fnmatchcase(variant.name, glob) for glob in only):
            continue
        q, k, v, kwargs = variant.inputs(LENGTH)
        for launch in triton_stats.plan(build_request(q, k, **kwargs), v).launches:
            for cfg in launch.configs:
                specialization = bind(launch, cfg, 90)[4]
                key = (launch.name, cfg, str(specialization))
                found.setdefault(key, ([], launch, cfg))[0].append(variant.name)
    return list(found.values())


def compile_launch(launch: Any, cfg: Any, capability: int) -> Any:
    """Compile ``launch`` with ``cfg`` for ``sm_<capability>`` as ``JITFunction.run`` would on
    that GPU (same argument specialisation, options and cache key)."""
    import triton
    from triton.compiler import ASTSource

    kernel = launch.kernel
    target, backend, kwargs, bound, specialization, options = bind(launch, cfg, capability)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def resources(cubin: bytes) -> dict[str, int]:
    """Registers, stack and local bytes per thread of the cubin's kernel (cuobjdump)."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out))
    return {
        "registers": int(found["REG"]),
        "stack": int(found["STACK"]),
        "local": int(found["LOCAL"]),
    }


def child(
    capability: int, shard: int, shards: int, variant_set: str, only: list[str], out: str
) -> None:
    """Compile this shard's jobs for one target; write one JSON record per job."""
    records = []
    for i, (names, launch, cfg) in enumerate(jobs(variant_set, only)):
        if i % shards != shard:
            continue
        start = time.perf_counter()
        record: dict[str, Any] = dict(
            variants=names,
            kernel=launch.name,
            dtype=str(launch.args[0].dtype).removeprefix("torch."),
            head_dim=launch.head_dim,
            heads=cfg.heads(launch.groups),
            config=cfg.label(),
            target=capability,
        )
        try:
            compiled = compile_launch(launch, cfg, capability)
            record.update(shared=compiled.metadata.shared, **resources(compiled.asm["cubin"]))
        except Exception as e:  # a variant that does not compile is a result, not a crash
            record["error"] = f"{type(e).__name__}: {str(e)[-1500:]}"
        record["seconds"] = round(time.perf_counter() - start, 2)
        records.append(record)
        print(json.dumps(record), flush=True)
    Path(out).write_text(json.dumps(records))


def problems(records: list[dict], limits: dict[int, int] | None = None) -> list[str]:
    """Compile errors, shared memory over the target's limit (``limits``: bytes per target,
    default ``launch.SHARED_MEMORY``), register spills."""
    from attnscope.kernels.launch import SHARED_MEMORY

    limits = limits or SHARED_MEMORY
    found = []
    for r in records:
        what = f"{r['variants'][0]} {r['kernel']} {r['config']} sm_{r['target']}"
        if "error" in r:
            found.append(f"{what}: {r['error']}")
            continue
        if r["shared"] > limits[r["target"]]:
            found.append(f"{what}: {r['shared']} bytes of shared memory")
        if r["stack"] or r["local"]:
            found.append(f"{what}: spills ({r['stack']} stack, {r['local']} local bytes)")
    return found


def table(records: list[dict]) -> str:
    """One markdown row per compiled kernel, the targets side by side."""
    targets = sorted({r["target"] for r in records})
    rows: dict[tuple, dict[int, dict]] = {}
    for r in records:
        key = (
            ", ".join(r["variants"]),
            r["kernel"],
            r["dtype"],
            r["head_dim"],
            r["heads"],
            r["config"],
        )
        rows.setdefault(key, {})[r["target"]] = r

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        if "error" in r:
            return "error"
        spill = "" if not (r["stack"] or r["local"]) else f", SPILLS {r['stack']} B"
        return f"{r['shared']} / {r['registers']}{spill}"

    head = " | ".join(f"sm_{t} smem B / regs" for t in targets)
    lines = [
        f"| variants | kernel | dtype | d | heads per tile | tile | {head} |",
        "|" + "---|" * (6 + len(targets)),
    ]
    for key, by_target in rows.items():
        cells = " | ".join(cell(by_target.get(t)) for t in targets)
        lines.append("| " + " | ".join(map(str, key)) + f" | {cells} |")
    return "\n".join(lines)


def compile_all(
    targets: list[int], shards: int, variant_set: str = "covering", only: list[str] | None = None
) -> tuple[list[dict], float]:
    """Run one child process per (target, shard) in parallel; their records and the wall time."""
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp())
    procs = []
    for capability in targets:
        for shard in range(shards):
            out = tmp / f"sm{capability}-{shard}.json"
            args = ["--child", str(capability), str(shard), str(shards), variant_set, str(out)]
            args += ["--only", *only] if only else []
            cmd = [sys.executable, __file__, *args]
            log = (tmp / f"{out.stem}.log").open("w")
            procs.append((subprocess.Popen(cmd, env=child_env(), stdout=log, stderr=log), out))
    records = []
    for proc, out in procs:
        if proc.wait() != 0:
            log = out.with_suffix(".log").read_text()
            raise RuntimeError(f"compiling {out.stem} failed:\n{log[-3000:]}")
        records += json.loads(out.read_text())
    return records, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--targets", type=int, nargs="+", default=[80, 90])
    parser.add_argument(
        "--shards", type=int, default=0, help="processes per target (default: cores / targets)"
    )
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--write", action="store_true", help="write the table to RESULTS.md")
    parser.add_argument(
        "--variants",
        choices=["covering", "gpu"],
        default="covering",
        help="launch.VARIANTS, or GPU_VARIANTS (adds fp32 feature variants, as the GPU tests run)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="GLOB",
        help="variants whose name matches a glob (e.g. 'fused-*'); --write refuses it",
    )
    parser.add_argument("--child", nargs=5, metavar=("CAP", "SHARD", "SHARDS", "SET", "OUT"))
    args = parser.parse_args()
    if args.child:
        capability, shard, shards, variant_set, out = args.child
        child(int(capability), int(shard), int(shards), variant_set, args.only, out)
        return 0
    if args.write and (args.only or args.variants != "covering"):
        parser.error("--write records the covering set: no --only, no --variants gpu")
    shards = args.shards or max(1, (os.cpu_count() or 1) // len(args.targets))
    records, wall = compile_all(args.targets, shards, args.variants, args.only)
    cpu = sum(r["seconds"] for r in records)
    text = table(records)
    bad = problems(records)
    print(text)
    print(
        f"\n{len(records)} kernels compiled in {wall:.0f} s ({cpu:.0f} s of compiling); "
        f"{len(bad)} problem(s)"
    )
    for line in bad:
        print("PROBLEM", line)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from harness import write_section

        from attnscope.kernels.launch import SHARED_MEMORY

        limits = ", ".join(f"sm_{t} {SHARED_MEMORY[t]} B" for t in args.targets)
        note = (
            f"`triton.compile` to cubin for `GPUTarget('cuda', 80 | 90, 32)` on a CPU-only "
            f"machine: each variant of `attnscope.kernels.launch.VARIANTS` at L = {LENGTH} with "
            "every launch configuration the CUDA autotuner may pick, arguments specialised as a "
            "CUDA launch would. Kernel `fused`: the row pass of the fused forward "
            "(`exact_logits=False`), which also accumulates P @ V. Cells: shared memory per block "
            f"(limits {limits}) / registers per thread (cuobjdump; stack 0 = no spills). Heads "
            "per tile: query heads of a KV group packed into one tile; d/2: score dots in two "
            f"slices of the head dim. {len(records)} kernels; this run {cpu:.0f} s of "
            f"compiling, {wall:.0f} s wall on {os.cpu_count()} cores (kernels found in the Triton "
            f"cache count ~0 s); {len(bad)} problem(s)."
        )
        write_section(SECTION, "python benchmarks/triton_compile.py --write", note + "\n\n" + text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
