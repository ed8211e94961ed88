"""One Arrow row per analysed prompt: how a Ray worker hands a prompt's run to the driver.

The worker saves the prompt's Trace (``Trace.save``, into a scratch directory) and sends the
files' bytes; the driver writes them as they are (``RunFiles.save``). Encoding (Parquet, JSON,
safetensors) thus runs in parallel on the workers, and the stored run is byte for byte what the
local engine stores.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from attnscope.atomic import write_dir_atomically
from attnscope.corpus import Storable

SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # null: the error says why the worker cannot analyse
        ("error", pa.string()),  # null when the prompt was analysed
        ("files", pa.map_(pa.string(), pa.large_binary())),  # file name -> bytes of its run
        ("tokens", pa.int64()),
        ("started", pa.float64()),  # time.time() when its batch started
        ("node", pa.string()),  # the Ray node that analysed it
    ]
)


@dataclass
class RunFiles:
    """A prompt's run as the files ``Trace.save`` wrote on the worker."""

    files: dict[str, bytes]
    tokens: int

    def __len__(self) -> int:
        return self.tokens

    def save(self, path: str | Path) -> Path:
        """Write the run directory ``path`` atomically, as ``Trace.save`` does."""

        def fill(tmp: Path) -> None:
            for name, data in self.files.items():
                (tmp / name).write_bytes(data)

        return write_dir_atomically(Path(path), fill)


def to_row(
    pid: str, outcome: Storable | str, started: float, node: str, scratch: Path
) -> dict[str, Any]:
    """The row of prompt ``pid``: its run's files (saved through the directory ``scratch``), or
    the error text that replaced it."""
    row = {"id": pid, "error": None, "files": None, "tokens": None}
    row |= {"started": started, "node": node}
    if isinstance(outcome, str):
        return row | {"error": outcome}
    run = outcome.save(scratch / pid)
    files = {f.name: f.read_bytes() for f in sorted(run.iterdir())}
    shutil.rmtree(run)
    return row | {"files": files, "tokens": len(outcome)}


def from_row(row: dict[str, Any]) -> RunFiles | str:
    """The run files (or error text) of a row written by ``to_row``."""
    if row["error"] is not None:
        return row["error"]
    return RunFiles(dict(row["files"]), row["tokens"])
