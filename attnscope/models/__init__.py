"""Model loading: aliases with offline packaged weights, local directories, cached HF ids.

The names are imported on first use: the alias table (``attnscope models``) needs no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnscope.lazy import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _SOURCES, __all__)
