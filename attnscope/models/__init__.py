"""Model loading: aliases with offline packaged weights, local directories, cached HF ids."""

from attnscope.models.loaded import LoadedModel
from attnscope.models.loader import load
from attnscope.models.registry import ALIASES, Alias

__all__ = ["ALIASES", "Alias", "LoadedModel", "load"]
