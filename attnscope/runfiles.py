"""File names inside a run directory, importable without torch (the store and the command line
read runs without loading a Trace)."""

TRACE_FILE = "trace.json"
STATS_FILE = "stats.parquet"
QK_FILE = "qk.safetensors"
