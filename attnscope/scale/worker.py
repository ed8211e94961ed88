"""``CorpusWorker``: the Ray Data callable class of a corpus run (one per actor)."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pyarrow as pa
from tqdm.auto import tqdm

from attnscope.corpus import analyze_in_batches, check_model
from attnscope.kernels.config import StatsConfig
from attnscope.models.loader import load
from attnscope.scale.rows import SCHEMA, to_row

KILL_WORKER = "ATTNSCOPE_TEST_KILL_WORKER"  # tests: a file path, see CorpusWorker.__call__


class CorpusWorker:
    """Loads the model once (by alias, directory or HF id; across the actor's GPUs with
    ``device_map="auto"`` when it has some), then analyses each block of ``(id, text)`` prompts
    with the local engine's ``analyze_in_batches``: one ``rows.SCHEMA`` row per prompt (its run's
    files), or one row without an id that says why the model did not load."""

    def __init__(
        self, model: str, generate: int, config: StatsConfig, batch_size: int, gpus: float
    ) -> None:
        import ray

        self.generate, self.config, self.batch_size = generate, config, batch_size
        self.node = ray.get_runtime_context().get_node_id()
        self.blocks = 0
        # a model that does not load is reported in a row (id null) that stops the run: Ray
        # passes on an error raised here only as the text of an ActorDiedError
        self.error: str | None = None
        try:
            self.lm = load(model, **({"device_map": "auto"} if gpus else {}))
            check_model(self.lm, config)
        except Exception as err:
            self.error = f"{type(err).__name__}: {err}"

    def __call__(self, block: pa.Table) -> pa.Table:
        if self.error is not None:
            row = {"id": None, "error": self.error, "started": 0.0, "node": self.node}
            return pa.Table.from_pylist([row], schema=SCHEMA)
        marker = os.environ.get(KILL_WORKER)
        if marker and self.blocks and not Path(marker).exists():
            # tests: the first worker to start a second block dies as a lost machine would
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        self.blocks += 1
        entries = list(zip(block["id"].to_pylist(), block["text"].to_pylist(), strict=True))
        rows = []
        with tqdm(disable=True) as bar, tempfile.TemporaryDirectory() as scratch:
            for result in analyze_in_batches(
                self.lm, entries, self.generate, self.config, self.batch_size, bar
            ):
                for pid, outcome in result.outcomes:
                    rows.append(to_row(pid, outcome, result.started, self.node, Path(scratch)))
        return pa.Table.from_pylist(rows, schema=SCHEMA)
