"""Dash explorer of stored runs: ``create_app(runs_root)`` or ``attnscope dashboard ROOT``."""

from attnscope.dashboard.app import create_app

__all__ = ["create_app"]
