"""attnscope: attention interpretability workbench.

import attnscope as asc
lm = asc.load("gemma3-270m")
trace = asc.analyze(lm, "Question: ...", generate=64)
asc.analyze_corpus(lm, ["text 1", "text 2"], generate=64, out="runs/corpus")
"""

from attnscope import kernels, metrics
from attnscope.analyze import analyze
from attnscope.corpus import analyze_corpus
from attnscope.models.loaded import LoadedModel
from attnscope.models.loader import load
from attnscope.probes.capture import Capture, capture
from attnscope.store import RunStore
from attnscope.trace import Trace

__version__ = "0.1.0"

__all__ = [
    "Capture",
    "LoadedModel",
    "RunStore",
    "Trace",
    "analyze",
    "analyze_corpus",
    "capture",
    "kernels",
    "load",
    "metrics",
]
