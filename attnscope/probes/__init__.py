"""Capture backends: the transformers attention interface, TransformerLens hooks."""

from attnscope.probes.capture import Capture, capture

__all__ = ["Capture", "capture"]
