"""``RunStore``: the run directories under one root, queried with DuckDB SQL."""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from attnscope.errors import AttnscopeError
from attnscope.runfiles import (
    CORPUS_FILE,
    CORPUS_FORMAT,
    CORPUS_VERSION,
    PROMPTS_DIR,
    RUN_VERSION,
    STATS_FILE,
    TRACE_FILE,
)

if TYPE_CHECKING:
    from attnscope.trace import Trace

MAX_ID_BYTES = 200  # leaves room for the temporary-directory prefix within a 255-byte file name
INDEX_COLUMNS = ("layer", "head", "position")  # every stats.parquet has these
# added by the store: constant per stats file
RUN_COLUMNS = pa.schema(
    [
        ("run", pa.string()),
        ("prompt", pa.string()),
        ("model_kind", pa.string()),
        ("attention", pa.string()),
    ]
)
TIMEOUT_S = 60.0  # default bounds of one query
MAX_ROWS = 100_000
MEMORY_LIMIT = "2GB"
THREADS = min(4, os.cpu_count() or 1)


class StoreWarning(UserWarning):
    """A run left out because it cannot be read (``RunStore.skipped``) or a query result cut to
    ``max_rows`` (``RunStore.truncated``)."""


class _Unreadable(Exception):
    """Why a run is skipped (a message without absolute paths)."""


@dataclass(frozen=True)
class RunInfo:
    name: str  # "NAME" for a single run, "NAME/ID" for prompt ID of corpus run NAME
    path: Path
    model: str
    n_tokens: int
    n_layers: int
    n_heads: int
    prompt: str | None = None  # the prompt id of a corpus prompt
    model_kind: str = "?"  # causal-lm, encoder, speech, vlm, ...
    attention: str = "?"  # causal, bidirectional or cross

    @property
    def run(self) -> str:
        """The top-level run directory's name (the corpus, for a corpus prompt)."""
        return self.name.split("/")[0]


class RunStore:
    """Runs are directories ``<root>/<name>/`` holding ``trace.json`` and ``stats.parquet``, or
    corpus runs ``<root>/<name>/`` holding ``corpus.json`` and one such run per prompt under
    ``prompts/<id>/`` (named ``<name>/<id>`` here).

    ``sql()`` sees two tables: ``stats`` (every run's long table plus ``run`` and ``prompt``
    columns, ``prompt`` NULL for single runs, and the run's ``model_kind`` and ``attention``:
    causal, bidirectional or cross) and ``runs`` (one row per run or corpus prompt, with the same
    columns). Schema: docs/SCHEMA.md. Queries are read-only, read no file but the runs'
    ``stats.parquet``, write none (no spilling), and are bounded: stopped after ``timeout``
    seconds (None: never), within DuckDB's ``memory_limit`` and ``threads``, their result cut to
    ``max_rows`` rows.

    A run that cannot be read (damaged or missing files, a link out of the root, written by a
    newer attnscope) is left out of ``runs()`` and queries with a ``StoreWarning``; ``skipped``
    maps each such run of the last listing to the reason.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        timeout: float | None = TIMEOUT_S,
        max_rows: int = MAX_ROWS,
        memory_limit: str = MEMORY_LIMIT,
        threads: int = THREADS,
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise AttnscopeError(f"runs root {self.root} does not exist or is not a directory")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.timeout = timeout
        self.max_rows = max_rows
        self.memory_limit = memory_limit
        self.threads = threads
        self.skipped: dict[str, str] = {}  # run name -> why the last listing left it out
        self.truncated = False  # whether the last sql() result was cut to max_rows

    def path_of(self, name: str) -> Path:
        """The directory of run ``name`` (``NAME`` or ``NAME/ID``); refuses names that would leave
        the root."""
        parts = name.split("/")
        if len(parts) > 2 or any(not part or part.startswith(".") for part in parts):
            raise AttnscopeError(f"no run named {name!r} under {self.root}")
        rel = parts if len(parts) == 1 else [parts[0], PROMPTS_DIR, parts[1]]
        path = self._inside(rel)
        if (
            path is None
            or not (path / TRACE_FILE).is_file()
            or (len(parts) == 2 and not (path.parent.parent / CORPUS_FILE).is_file())
        ):
            raise AttnscopeError(f"no run named {name!r} under {self.root}")
        return path

    def _inside(self, rel: list[str]) -> Path | None:
        """``root/rel`` resolved, or None where links take it out of the root or to another
        depth."""
        path = self.root.joinpath(*rel).resolve()
        if path.is_relative_to(self.root) and len(path.relative_to(self.root).parts) == len(rel):
            return path
        return None

    def runs(self) -> list[RunInfo]:
        """Every readable run by directory name, a corpus run as its stored prompts
        (``NAME/ID``) in corpus order; the others are skipped with a warning (``skipped``)."""
        found, self.skipped = self._scan()
        return [info for info, _ in found]

    def _scan(self) -> tuple[list[tuple[RunInfo, pa.Schema]], dict[str, str]]:
        """``runs()``, each with the Arrow schema of its stats file, and the skipped runs."""
        found: list[tuple[RunInfo, pa.Schema]] = []
        skipped: dict[str, str] = {}  # filled here, then swapped in whole: pages list in threads
        for run_dir in sorted(self.root.iterdir()):
            if run_dir.name.startswith(".") or not run_dir.is_dir():  # temporary or replaced
                continue
            if (run_dir / TRACE_FILE).is_file():
                candidates = [(run_dir.name, [run_dir.name], None)]
            elif (run_dir / CORPUS_FILE).is_file():
                try:
                    prompts = self._corpus_prompts(run_dir)
                except _Unreadable as why:
                    _skip(skipped, run_dir.name, why, "corpus run")
                    continue
                candidates = [
                    (f"{run_dir.name}/{p}", [run_dir.name, PROMPTS_DIR, p], p) for p in prompts
                ]
            else:
                continue
            for name, rel, prompt in candidates:
                try:
                    found.append(self._run_info(name, rel, prompt))
                except _Unreadable as why:
                    _skip(skipped, name, why)
        return found, skipped

    def load(self, name: str) -> Trace:
        from attnscope.trace import Trace  # torch: only when a run is loaded

        return Trace.load(self.path_of(name))

    def sql(self, query: str) -> pa.Table:
        """Run one read-only SQL query over ``stats`` and ``runs``: an Arrow table of at most
        ``max_rows`` rows (``truncated`` and a ``StoreWarning`` say when more were cut)."""
        self.truncated = False
        scanned, skipped = self._scan()
        runs, stats = _stats_dataset(scanned, skipped)
        self.skipped = skipped
        if not runs:
            unread = f" that can be read ({len(self.skipped)} skipped)" if self.skipped else ""
            raise AttnscopeError(
                f"no runs under {self.root}{unread}: write one with `attnscope analyze`"
            )
        with closing(self._connect(runs, stats)) as con:
            try:
                statements = con.extract_statements(query)
            except duckdb.Error as err:
                raise AttnscopeError(f"SQL does not parse: {err}") from err
            if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
                raise AttnscopeError(
                    "RunStore.sql accepts a single SELECT (or WITH ... SELECT) query"
                )
            with _deadline(con, self.timeout) as expired:
                try:
                    reader = con.sql(query).to_arrow_reader(min(self.max_rows + 1, 1 << 17))
                    batches, n_rows = [], 0
                    for batch in reader:  # streamed: no more than max_rows + a batch are held
                        batches.append(batch)
                        n_rows += batch.num_rows
                        if n_rows > self.max_rows:
                            break
                except duckdb.Error as err:
                    raise AttnscopeError(self._failure(err, expired())) from err
        table = pa.Table.from_batches(batches, schema=reader.schema)
        if n_rows > self.max_rows:
            self.truncated = True
            warnings.warn(
                f"the result has more than {self.max_rows} rows: returning the first "
                f"{self.max_rows} (aggregate or LIMIT in SQL, or raise max_rows)",
                StoreWarning,
                stacklevel=2,
            )
        return table.slice(0, self.max_rows)

    def _failure(self, err: duckdb.Error, expired: bool) -> str:
        """The message of a query DuckDB stopped."""
        if expired and isinstance(err, duckdb.InterruptException):
            return (
                f"the query ran past its {self.timeout:g} s limit and was stopped: narrow it "
                "(WHERE run = ..., aggregates) or allow more time (--timeout SECONDS; "
                "RunStore(timeout=...))"
            )
        if isinstance(err, duckdb.OutOfMemoryException):
            return (
                f"the query needs more than its memory limit {self.memory_limit}: aggregate more "
                "or raise it (--memory-limit, e.g. 8GB; RunStore(memory_limit=...))"
            )
        if isinstance(err, duckdb.PermissionException):
            return f"queries read only the tables stats and runs: {err}"
        return f"SQL failed: {err}"

    def _connect(self, runs: list[RunInfo], stats: ds.Dataset) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB that can open no file, with the tables ``runs`` and ``stats``:
        the checked stats files, read through Arrow (DuckDB checks allowed paths lexically, so
        ``<root>/link/../x`` would pass them)."""
        try:
            con = duckdb.connect(
                config={
                    "temp_directory": "",  # no spilling; a default would be allowed (<cwd>/.tmp)
                    "memory_limit": self.memory_limit,
                    "threads": self.threads,
                    "autoinstall_known_extensions": False,
                    "autoload_known_extensions": False,
                }
            )
        except duckdb.Error as err:
            raise AttnscopeError(
                f"memory limit {self.memory_limit!r} is not a size such as 2GB or 512MB ({err})"
            ) from err
        con.execute("SET enable_external_access = false")
        con.register("stats", stats)
        table = pa.table(
            {
                "run": pa.array([r.run for r in runs], pa.string()),
                "prompt": pa.array([r.prompt for r in runs], pa.string()),
                "model": [r.model for r in runs],
                "model_kind": [r.model_kind for r in runs],
                "attention": [r.attention for r in runs],
                "n_tokens": [r.n_tokens for r in runs],
                "n_layers": [r.n_layers for r in runs],
                "n_heads": [r.n_heads for r in runs],
            }
        )
        con.register("runs", table)
        con.execute("SET lock_configuration = true")
        return con

    def _run_info(self, name: str, rel: list[str], prompt: str | None) -> tuple[RunInfo, pa.Schema]:
        """The summary of the run at ``root/rel`` from its header and the schema of its stats,
        after checking that its files can be read (``_Unreadable`` says why not)."""
        path = self._inside(rel)
        if path is None:
            raise _Unreadable("it links out of the runs root")
        try:
            header = json.loads((path / TRACE_FILE).read_text())
            _check_version(header, RUN_VERSION, "")
            info = RunInfo(
                name=name,
                path=path,
                model=str(header.get("meta", {}).get("model", "?")),
                n_tokens=len(header["tokens"]),
                n_layers=len(header["layers"]),
                n_heads=int(header["n_heads"]),
                prompt=prompt,
                model_kind=str(header.get("meta", {}).get("kind", "?")),
                attention=str(header.get("meta", {}).get("attention", "?")),
            )
            columns = [
                *INDEX_COLUMNS,
                *header.get("row_metrics", ()),
                *header.get("col_metrics", ()),
            ]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise _Unreadable(f"cannot read {TRACE_FILE} ({_reason(err)})") from err
        n_rows = info.n_layers * info.n_heads * info.n_tokens
        return info, self._check_stats(path / STATS_FILE, n_rows, columns)

    def _check_stats(self, file: Path, n_rows: int, columns: list[str]) -> pa.Schema:
        """The schema of a stats file; refuses one that is missing, outside the root, damaged or
        does not fit its header (Parquet footer only: nothing else is read)."""
        if not file.is_file():
            raise _Unreadable(f"{STATS_FILE} is missing")
        if not file.resolve().is_relative_to(self.root):
            raise _Unreadable(f"{STATS_FILE} links out of the runs root")
        try:
            meta = pq.read_metadata(file)
        except (OSError, ValueError) as err:  # pyarrow: ArrowIOError, ArrowInvalid
            what = "is empty" if file.stat().st_size == 0 else f"is damaged ({_reason(err)})"
            raise _Unreadable(f"{STATS_FILE} {what}") from err
        missing = [c for c in columns if c not in meta.schema.names]
        if missing:
            raise _Unreadable(f"{STATS_FILE} lacks the columns {missing} its {TRACE_FILE} names")
        if meta.num_rows != n_rows:
            raise _Unreadable(
                f"{STATS_FILE} holds {meta.num_rows} rows, not the {n_rows} (layers x heads x "
                f"tokens) of its {TRACE_FILE}"
            )
        reserved = [c for c in RUN_COLUMNS.names if c in meta.schema.names]
        if reserved:
            raise _Unreadable(f"{STATS_FILE} has columns {reserved}, which the store adds")
        return meta.schema.to_arrow_schema()

    def _corpus_prompts(self, run_dir: Path) -> list[str]:
        """Ids of the stored prompts of a corpus run, in corpus order (``_Unreadable`` if its
        manifest cannot be read)."""
        if self._inside([run_dir.name]) is None:
            raise _Unreadable("it links out of the runs root")
        try:
            manifest = json.loads((run_dir / CORPUS_FILE).read_text())
            if manifest.get("format") != CORPUS_FORMAT:
                raise ValueError(f"format is {manifest.get('format')!r}, not {CORPUS_FORMAT!r}")
            _check_version(manifest, CORPUS_VERSION, "corpus ")
            ids = [str(pid) for pid in manifest["prompts"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise _Unreadable(f"cannot read {CORPUS_FILE} ({_reason(err)})") from err
        return [
            pid
            for pid in ids
            if id_problem(pid) is None and (run_dir / PROMPTS_DIR / pid / TRACE_FILE).is_file()
        ]


def _skip(skipped: dict[str, str], name: str, why: _Unreadable, kind: str = "run") -> None:
    skipped[name] = str(why)
    warnings.warn(f"skipping {kind} {name!r}: {why}", StoreWarning, stacklevel=4)


def _stats_dataset(
    scanned: list[tuple[RunInfo, pa.Schema]], skipped: dict[str, str]
) -> tuple[list[RunInfo], ds.Dataset]:
    """The runs' stats files as one Arrow dataset: the union of their columns, then ``run`` and
    ``prompt``; a run whose column types conflict with an earlier run's is skipped."""
    runs, schema = [], pa.schema([])
    for info, run_schema in scanned:
        try:
            schema = pa.unify_schemas([schema, run_schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            why = f"{STATS_FILE} has column types other runs do not ({_reason(err)})"
            _skip(skipped, info.name, _Unreadable(why))
            continue
        runs.append(info)
    stats = ds.FileSystemDataset.from_paths(
        [str(r.path / STATS_FILE) for r in runs],
        schema=pa.unify_schemas([schema, RUN_COLUMNS]),
        format=ds.ParquetFileFormat(),
        filesystem=pafs.LocalFileSystem(),
        partitions=[  # constant columns of each file, which also prune files on WHERE run = ...
            (ds.field("run") == r.run)
            & (ds.field("prompt").is_null() if r.prompt is None else ds.field("prompt") == r.prompt)
            & (ds.field("model_kind") == r.model_kind)
            & (ds.field("attention") == r.attention)
            for r in runs
        ],
    )
    return runs, stats


def _check_version(header: dict, newest: int, kind: str) -> None:
    """``_Unreadable`` for a file written by a newer attnscope."""
    version = header.get("format_version", 0)
    if version > newest:
        raise _Unreadable(
            f"written by a newer attnscope ({kind}format {version} > {newest}): "
            "upgrade attnscope to read it"
        )


def _reason(err: Exception) -> str:
    """An error's message without the path an OSError names."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return f"{type(err).__name__}: {err}"


@contextmanager
def _deadline(
    con: duckdb.DuckDBPyConnection, seconds: float | None
) -> Iterator[Callable[[], bool]]:
    """Interrupt ``con``'s query after ``seconds`` (None: never); yields whether it did."""
    fired = threading.Event()
    if seconds is None:
        yield fired.is_set
        return

    def stop() -> None:
        fired.set()
        con.interrupt()

    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    timer.start()
    try:
        yield fired.is_set
    finally:
        timer.cancel()
        timer.join()  # never interrupts a later query, nor a closed connection


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
    if any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        return "is not valid Unicode (a byte that is not UTF-8)"
    if len(name.encode()) > MAX_ID_BYTES:
        return f"is longer than {MAX_ID_BYTES} bytes"
    return None
