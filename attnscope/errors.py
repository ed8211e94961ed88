"""Exceptions that name the problem and what to do about it."""


class AttnscopeError(Exception):
    """Base class of every error attnscope raises on purpose."""


class ModelNotFoundError(AttnscopeError):
    """An alias, HF id or directory that cannot be resolved offline."""


class MissingDependencyError(AttnscopeError):
    """An optional package is needed for this feature but not installed."""


class UnsupportedMetricError(AttnscopeError):
    """A backend was asked for a metric it cannot compute."""


class ShapeError(AttnscopeError, ValueError):
    """Tensors whose shapes do not fit together."""


class RunExistsError(AttnscopeError):
    """A run directory already exists and overwriting was not requested."""
