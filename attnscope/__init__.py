"""attnscope: attention interpretability workbench.

import attnscope as asc
lm = asc.load("gemma3-270m")
trace = asc.analyze(lm, "Question: ...", generate=64)
asc.analyze_corpus(lm, ["text 1", "text 2"], generate=64, out="runs/corpus")

The names below are imported on first use, so ``import attnscope`` (and the command line's
start-up) does not import torch or transformers.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from attnscope.lazy import lazy_names

if TYPE_CHECKING:
    from attnscope import kernels, metrics
    from attnscope.analyze import analyze
    from attnscope.corpus import analyze_corpus
    from attnscope.kernels.config import StatsConfig
    from attnscope.models.loaded import LoadedModel
    from attnscope.models.loader import load
    from attnscope.probes.capture import Capture, capture
    from attnscope.probes.valuenorm import value_norm
    from attnscope.store import RunStore
    from attnscope.taxonomy.detect import heads
    from attnscope.trace import Trace
    from attnscope.vision import analyze_vit

__version__ = "0.1.0"

__all__ = [
    "Capture",
    "LoadedModel",
    "RunStore",
    "StatsConfig",
    "Trace",
    "analyze",
    "analyze_corpus",
    "analyze_vit",
    "capture",
    "heads",
    "kernels",
    "load",
    "metrics",
    "value_norm",
]

_SOURCES: dict[str, str | None] = {  # public name -> its module (None: the submodule itself)
    "Capture": "attnscope.probes.capture",
    "LoadedModel": "attnscope.models.loaded",
    "RunStore": "attnscope.store",
    "StatsConfig": "attnscope.kernels.config",
    "Trace": "attnscope.trace",
    "analyze": "attnscope.analyze",
    "analyze_corpus": "attnscope.corpus",
    "analyze_vit": "attnscope.vision",
    "capture": "attnscope.probes.capture",
    "heads": "attnscope.taxonomy.detect",
    "kernels": None,
    "load": "attnscope.models.loader",
    "metrics": None,
    "value_norm": "attnscope.probes.valuenorm",
}
__getattr__, __dir__ = lazy_names(__name__, _SOURCES, __all__)


class _Package(ModuleType):
    """Importing the submodule ``attnscope.analyze`` binds it as an attribute of the package;
    the public function ``analyze`` keeps that name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "analyze" and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
