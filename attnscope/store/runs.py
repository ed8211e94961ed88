"""``RunStore``: the run directories under one root, queried with DuckDB SQL."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

from attnscope.errors import AttnscopeError
from attnscope.runfiles import STATS_FILE, TRACE_FILE

if TYPE_CHECKING:
    from attnscope.trace import Trace

CORPUS_FILE = "corpus.json"  # manifest of a corpus run (attnscope.corpus)
CORPUS_FORMAT = "attnscope-corpus"
PROMPTS_DIR = "prompts"  # <corpus>/prompts/<id>/ holds one run per prompt
MAX_ID_BYTES = 200  # leaves room for the temporary-directory prefix within a 255-byte file name


@dataclass(frozen=True)
class RunInfo:
    name: str  # "NAME" for a single run, "NAME/ID" for prompt ID of corpus run NAME
    path: Path
    model: str
    n_tokens: int
    n_layers: int
    n_heads: int
    prompt: str | None = None  # the prompt id of a corpus prompt

    @property
    def run(self) -> str:
        """The top-level run directory's name (the corpus, for a corpus prompt)."""
        return self.name.split("/")[0]


class RunStore:
    """Runs are directories ``<root>/<name>/`` holding ``trace.json`` and ``stats.parquet``, or
    corpus runs ``<root>/<name>/`` holding ``corpus.json`` and one such run per prompt under
    ``prompts/<id>/`` (named ``<name>/<id>`` here).

    ``sql()`` sees two tables: ``stats`` (every run's long table plus ``run`` and ``prompt``
    columns; ``prompt`` is NULL for single runs) and ``runs`` (one row per run or corpus prompt,
    with the same two columns). Queries are read-only and cannot touch files outside ``root``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise AttnscopeError(f"runs root {self.root} does not exist or is not a directory")

    def path_of(self, name: str) -> Path:
        """The directory of run ``name`` (``NAME`` or ``NAME/ID``); refuses names that would leave
        the root."""
        parts = name.split("/")
        if len(parts) > 2 or any(not part or part.startswith(".") for part in parts):
            raise AttnscopeError(f"no run named {name!r} under {self.root}")
        rel = parts if len(parts) == 1 else [parts[0], PROMPTS_DIR, parts[1]]
        path = self.root.joinpath(*rel).resolve()
        if (
            not path.is_relative_to(self.root)
            or len(path.relative_to(self.root).parts) != len(rel)
            or not (path / TRACE_FILE).is_file()
            or (len(parts) == 2 and not (path.parent.parent / CORPUS_FILE).is_file())
        ):
            raise AttnscopeError(f"no run named {name!r} under {self.root}")
        return path

    def runs(self) -> list[RunInfo]:
        """Every run by directory name, a corpus run as its stored prompts (``NAME/ID``) in corpus
        order; a run whose files cannot be read is skipped with a warning."""
        found: list[RunInfo | None] = []
        for run_dir in sorted(self.root.iterdir()):
            if run_dir.name.startswith(".") or not run_dir.is_dir():  # temporary or replaced
                continue
            if (run_dir / TRACE_FILE).is_file():
                found.append(_run_info(run_dir.name, run_dir))
            elif (run_dir / CORPUS_FILE).is_file():
                for pid in _corpus_prompts(run_dir):
                    found.append(
                        _run_info(f"{run_dir.name}/{pid}", run_dir / PROMPTS_DIR / pid, pid)
                    )
        return [info for info in found if info is not None]

    def load(self, name: str) -> Trace:
        from attnscope.trace import Trace  # torch: only when a run is loaded

        return Trace.load(self.path_of(name))

    def sql(self, query: str) -> pa.Table:
        """Run one read-only SQL query over ``stats`` and ``runs``; returns an Arrow table."""
        runs = self.runs()
        if not runs:
            raise AttnscopeError(f"no runs under {self.root}: write one with `attnscope analyze`")
        con = self._connect(runs)
        try:
            statements = con.extract_statements(query)
        except duckdb.Error as err:
            raise AttnscopeError(f"SQL does not parse: {err}") from err
        if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
            raise AttnscopeError("RunStore.sql accepts a single SELECT (or WITH ... SELECT) query")
        try:
            return con.sql(query).to_arrow_table()
        except duckdb.Error as err:
            raise AttnscopeError(f"SQL failed: {err}") from err
        finally:
            con.close()

    def _connect(self, runs: list[RunInfo]) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect()
        root = str(self.root) + "/"
        con.execute("SET allowed_directories = [?]", [root])
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        files = [str(r.path / STATS_FILE) for r in runs]
        names = pa.array([r.run for r in runs], pa.string())
        prompts = pa.array([r.prompt for r in runs], pa.string())
        con.register("stats_files", pa.table({"file": files, "run": names, "prompt": prompts}))
        con.execute(
            "CREATE VIEW stats AS SELECT s.* EXCLUDE (filename), f.run, f.prompt "
            f"FROM read_parquet([{', '.join(map(sql_string, files))}], filename = true, "
            "union_by_name = true) s JOIN stats_files f ON s.filename = f.file"
        )
        table = pa.table(
            {
                "run": names,
                "prompt": prompts,
                "model": [r.model for r in runs],
                "n_tokens": [r.n_tokens for r in runs],
                "n_layers": [r.n_layers for r in runs],
                "n_heads": [r.n_heads for r in runs],
            }
        )
        con.register("runs_arrow", table)
        con.execute("CREATE VIEW runs AS SELECT * FROM runs_arrow")
        return con


def sql_string(text: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"


def id_problem(name: str) -> str | None:
    """Why ``name`` cannot be a run or prompt directory name, or None when it can."""
    if not name:
        return "is empty"
    if name.startswith("."):
        return "starts with '.'"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if any(ord(c) < 32 for c in name):
        return "contains a control character"
    if len(name.encode()) > MAX_ID_BYTES:
        return f"is longer than {MAX_ID_BYTES} bytes"
    return None


def _run_info(name: str, path: Path, prompt: str | None = None) -> RunInfo | None:
    """The summary of the run in ``path`` from its header; None (and a warning) if unreadable."""
    try:
        header = json.loads((path / TRACE_FILE).read_text())
        return RunInfo(
            name=name,
            path=path,
            model=str(header.get("meta", {}).get("model", "?")),
            n_tokens=len(header["tokens"]),
            n_layers=len(header["layers"]),
            n_heads=int(header["n_heads"]),
            prompt=prompt,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        warnings.warn(
            f"skipping run {name!r}: cannot read {path / TRACE_FILE} ({err!r})", stacklevel=3
        )
        return None


def _corpus_prompts(run_dir: Path) -> list[str]:
    """Ids of the stored prompts of a corpus run, in corpus order ([] and a warning if its
    manifest cannot be read)."""
    try:
        manifest = json.loads((run_dir / CORPUS_FILE).read_text())
        if manifest.get("format") != CORPUS_FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}, not {CORPUS_FORMAT!r}")
        ids = [str(pid) for pid in manifest["prompts"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        warnings.warn(f"skipping corpus run {run_dir.name!r}: {err!r}", stacklevel=3)
        return []
    return [
        pid
        for pid in ids
        if id_problem(pid) is None and (run_dir / PROMPTS_DIR / pid / TRACE_FILE).is_file()
    ]
