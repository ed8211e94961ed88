"""File names and format versions of run directories, importable without torch (the store, the
writers and the command line read runs without loading a Trace)."""

TRACE_FILE = "trace.json"
STATS_FILE = "stats.parquet"
QK_FILE = "qk.safetensors"
RUN_VERSION = 1  # newest trace.json format_version this attnscope writes and reads

CORPUS_FILE = "corpus.json"  # the manifest of a corpus run (attnscope.corpus)
CORPUS_FORMAT = "attnscope-corpus"  # its "format" field
CORPUS_VERSION = 1  # newest corpus.json format_version
PROMPTS_DIR = "prompts"  # <corpus>/prompts/<id>/ holds one run per prompt

HEADS_FILE = "heads.parquet"  # the head table an `attnscope heads` run writes beside its trace
