"""``ray_batches``: the Ray Data engine of ``analyze_corpus`` (see the package docstring)."""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from attnscope.corpus import BatchResult
from attnscope.errors import AttnscopeError
from attnscope.kernels.config import StatsConfig
from attnscope.scale.rows import from_row

MAX_BLOCKS = 4000  # Ray Data blocks of a run: about 1 ms each to create; a retry redoes one
WAIT_FOR_WORKERS_S = 3600  # the pool waits this long for every worker to load its model
# environment variables a worker gets from the driver: attnscope's own and the offline switches
FORWARDED = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class RayEngine:
    """Where and how wide a corpus run goes on Ray.

    ``address``: the cluster to join (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``). None
    uses the Ray instance this process has already initialised, else ``RAY_ADDRESS``, else a new
    local instance that ends with the run. ``workers``: actors, each loading the model once (at
    most one per block of prompts). ``cpus_per_worker`` / ``gpus_per_worker``: what each actor
    reserves; with GPUs the model is placed across the actor's GPUs (``device_map="auto"``).
    """

    address: str | None = None
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError(
                "cpus_per_worker and gpus_per_worker must be >= 0, got "
                f"{self.cpus_per_worker} and {self.gpus_per_worker}"
            )


def ray_batches(
    engine: RayEngine,
    model: str,
    entries: list[tuple[str, str]],
    generate: int,
    config: StatsConfig,
    batch_size: int,
    bar: tqdm,
) -> Iterator[BatchResult]:
    """Analyse the ``(id, text)`` prompts on Ray: ``CorpusWorker`` actors load ``model`` and run
    blocks of prompts; the results arrive as they finish (a retried block may arrive twice).
    ``bar`` counts prompts."""
    if not entries:
        return
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise AttnscopeError("engine='ray' needs Ray Data: pip install 'attnscope[scale]'") from err
    from attnscope.scale.worker import CorpusWorker

    own = not ray.is_initialized()
    if own:
        ray.init(address=engine.address, logging_level="WARNING")
    try:
        ds = _dataset(entries, batch_size)
        workers = min(engine.workers, ds.num_blocks())
        _check_fits(engine, workers, ray.cluster_resources())
        if not bar.disable:
            bar.write(f"starting {workers} Ray worker(s) for {model} ...", file=sys.stderr)
        env = {k: v for k, v in os.environ.items() if k.startswith("ATTNSCOPE_") or k in FORWARDED}
        remote: dict[str, Any] = {"num_cpus": engine.cpus_per_worker}
        if engine.gpus_per_worker:
            remote["num_gpus"] = engine.gpus_per_worker
        if env:
            remote["runtime_env"] = {"env_vars": env}
        ds = ds.map_batches(
            CorpusWorker,
            fn_constructor_kwargs={
                "model": model,
                "generate": generate,
                "config": config,
                "batch_size": batch_size,
                "gpus": engine.gpus_per_worker,
            },
            batch_size=None,  # one call per block
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
            **remote,
        )
        ds.context.wait_for_min_actors_s = WAIT_FOR_WORKERS_S  # work starts on every worker
        ds.context.enable_progress_bars = False  # ours counts prompts and tokens
        ds.context.print_on_execution_start = False
        bar.unit = "prompt"
        bar.reset(total=len(entries))
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = table.to_pylist()
            if broken := [r["error"] for r in rows if r["id"] is None]:
                raise AttnscopeError(f"the Ray workers cannot analyse with {model!r}: {broken[0]}")
            for (started, node), group in itertools.groupby(
                rows, key=lambda r: (r["started"], r["node"])
            ):
                outcomes = [(r["id"], from_row(r)) for r in group]
                bar.update(len(outcomes))
                yield BatchResult(outcomes, started, node)
    finally:
        if own:
            ray.shutdown()


def _check_fits(engine: RayEngine, workers: int, resources: dict[str, float]) -> None:
    """Refuse workers the cluster cannot hold all at once (the run waits for all of them)."""
    for name, each in (("CPU", engine.cpus_per_worker), ("GPU", engine.gpus_per_worker)):
        have = resources.get(name, 0.0)
        if each * workers > have:
            fit = int(have // each)
            raise AttnscopeError(
                f"{workers} Ray worker(s) of {each:g} {name}(s) each need {each * workers:g} "
                f"{name}(s); the cluster has {have:g}: "
                + (f"use at most {fit} worker(s) (CLI: --workers {fit}) or " if fit else "use ")
                + f"fewer {name}s per worker (--{name.lower()}s-per-worker)"
            )


def _dataset(entries: list[tuple[str, str]], batch_size: int) -> Any:
    """The prompts as a Ray dataset of ``id`` and ``text``, sorted by text length, in blocks of
    about ``batch_size`` prompts (more when that would make over ``MAX_BLOCKS`` blocks)."""
    import ray.data

    items = [{"id": pid, "text": text} for pid, text in sorted(entries, key=lambda e: len(e[1]))]
    blocks = min(math.ceil(len(items) / batch_size), MAX_BLOCKS)
    return ray.data.from_items(items, override_num_blocks=blocks)
