"""``RunStore``: the run directories under one root, queried with DuckDB SQL."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from attnscope.errors import AttnscopeError
from attnscope.trace import STATS_FILE, TRACE_FILE, Trace


@dataclass(frozen=True)
class RunInfo:
    name: str
    path: Path
    model: str
    n_tokens: int
    n_layers: int
    n_heads: int


class RunStore:
    """Runs are directories ``<root>/<name>/`` holding ``trace.json`` and ``stats.parquet``.

    ``sql()`` sees two tables: ``stats`` (every run's long table plus a ``run`` column) and
    ``runs`` (one row per run). Queries are read-only and cannot touch files outside ``root``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise AttnscopeError(f"runs root {self.root} does not exist or is not a directory")

    def path_of(self, name: str) -> Path:
        """The directory of run ``name``; refuses names that would leave the root."""
        path = (self.root / name).resolve()
        if path.parent != self.root or not (path / TRACE_FILE).is_file():
            raise AttnscopeError(f"no run named {name!r} under {self.root}")
        return path

    def runs(self) -> list[RunInfo]:
        found = []
        for header_file in sorted(self.root.glob(f"*/{TRACE_FILE}")):
            if header_file.parent.name.startswith("."):  # temporary or replaced runs
                continue
            header = json.loads(header_file.read_text())
            found.append(
                RunInfo(
                    name=header_file.parent.name,
                    path=header_file.parent,
                    model=str(header.get("meta", {}).get("model", "?")),
                    n_tokens=len(header["tokens"]),
                    n_layers=len(header["layers"]),
                    n_heads=header["n_heads"],
                )
            )
        return found

    def load(self, name: str) -> Trace:
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
        files = ", ".join(_sql_string(str(r.path / STATS_FILE)) for r in runs)
        con.execute(
            "CREATE VIEW stats AS SELECT * EXCLUDE (filename), "
            "regexp_extract(filename, '([^/]+)/[^/]+$', 1) AS run "
            f"FROM read_parquet([{files}], filename = true, union_by_name = true)"
        )
        table = pa.table(
            {
                "run": [r.name for r in runs],
                "model": [r.model for r in runs],
                "n_tokens": [r.n_tokens for r in runs],
                "n_layers": [r.n_layers for r in runs],
                "n_heads": [r.n_heads for r in runs],
            }
        )
        con.register("runs_arrow", table)
        con.execute("CREATE VIEW runs AS SELECT * FROM runs_arrow")
        return con


def _sql_string(text: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"
