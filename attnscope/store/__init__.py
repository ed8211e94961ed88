"""Run directories (trace.json + stats.parquet) and DuckDB queries over them."""

from attnscope.store.runs import RunInfo, RunStore, StoreWarning

__all__ = ["RunInfo", "RunStore", "StoreWarning"]
