"""attnscope: attention interpretability workbench.

import attnscope as asc
lm = asc.load("gemma3-270m")
trace = asc.analyze(lm, "Question: ...", generate=64)
"""

from attnscope import kernels, metrics
from attnscope.analyze import analyze
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
    "capture",
    "kernels",
    "load",
    "metrics",
]
