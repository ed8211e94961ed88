"""``create_app(runs_root)``: the Dash explorer over the runs under one directory."""

from __future__ import annotations

from pathlib import Path

from dash import Dash

from attnscope.dashboard.callbacks import register
from attnscope.dashboard.layout import build_layout
from attnscope.store import RunStore


def create_app(runs_root: str | Path) -> Dash:
    """The explorer app; it reads runs only through ``RunStore(runs_root)``.

    Serve it with ``app.run(host="127.0.0.1", port=8050)`` or ``attnscope dashboard ROOT``.
    """
    store = RunStore(runs_root)
    app = Dash(__name__, title="attnscope explorer")
    app.layout = lambda: build_layout(store)  # re-lists the runs on every page load
    register(app, store)
    return app
