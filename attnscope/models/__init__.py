"""Model loading: aliases with offline packaged weights, local directories, cached HF ids.

The names are imported on first use: the alias table (``attnscope models``) needs no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attnscope.models.loaded import LoadedModel
    from attnscope.models.loader import load
    from attnscope.models.registry import ALIASES, Alias

__all__ = ["ALIASES", "Alias", "LoadedModel", "load"]

_SOURCES = {  # public name -> the module that defines it
    "ALIASES": "attnscope.models.registry",
    "Alias": "attnscope.models.registry",
    "LoadedModel": "attnscope.models.loaded",
    "load": "attnscope.models.loader",
}


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
