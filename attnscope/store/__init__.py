"""Run directories (trace.json + stats.parquet) and DuckDB queries over them."""

from attnscope.store.runs import RunInfo, RunStore

__all__ = ["RunInfo", "RunStore"]
