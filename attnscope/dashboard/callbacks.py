"""Views (plain functions of the store and the page's inputs) and their Dash wiring.

The ``loaded`` store holds the name of the run that loaded without error; every other view
starts from it, so a broken run shows one error (in the run info) instead of one per view.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import plotly.graph_objects as go
from dash import Dash, Input, Output, State, ctx, html

from attnscope.dashboard import figures
from attnscope.dashboard.data import (
    ALL_LAYERS,
    attention_window,
    empty_root_message,
    error_text,
    fmt,
    head_stats,
    head_tags,
    layer_index,
    list_runs,
    load_run,
    page_text,
    qk_layers,
    token_summary,
)
from attnscope.dashboard.layout import message, token_table
from attnscope.errors import AttnscopeError
from attnscope.store import RunStore
from attnscope.trace import Trace

log = logging.getLogger(__name__)
TOKEN_METRICS = ("fai", "received")  # column metrics shown next to the chosen row metric


def run_view(
    store: RunStore, name: str | None, metric: str | None, layer: Any
) -> tuple[html.Div, str | None, list[dict], str | None, list[dict], Any, go.Figure]:
    """Run info, ``loaded``, metric options/value, layer options/value, head grid."""
    if name is None:
        text = "Pick a run." if list_runs(store) else empty_root_message(store)
        return message(text), None, [], None, [], None, figures.empty_figure()
    trace = load_run(store, name)
    metrics = [*trace.rows, *trace.cols]
    metric_options = [{"label": f"{m} (row)", "value": m} for m in trace.rows] + [
        {"label": f"{m} (column)", "value": m} for m in trace.cols
    ]
    layer_options = [{"label": "all", "value": ALL_LAYERS}] + [
        {"label": str(layer), "value": layer} for layer in trace.layers
    ]
    metric = metric if metric in metrics else ("entropy" if "entropy" in metrics else metrics[0])
    layer = layer if layer in trace.layers else ALL_LAYERS
    return (
        _run_info(name, trace),
        name,
        metric_options,
        metric,
        layer_options,
        layer,
        figures.head_grid(trace),
    )


def _run_info(name: str, trace: Trace) -> html.Div:
    """Model, sizes, spans, the text and which layers kept q/k."""
    meta = trace.meta
    kept = qk_layers(trace)
    text = str(meta.get("text", ""))
    if meta.get("generated_text"):
        text += f"[{meta['generated_text']}]"
    return html.Div(
        [
            html.B(name),
            f": model {meta.get('model', '?')}, {len(trace)} tokens, {len(trace.layers)} layers x "
            f"{trace.n_heads} heads, spans {trace.spans}",
            html.Div(text[:600], style={"fontFamily": "monospace", "margin": "4px 0"}),
            message(
                f"queries/keys kept for layers {kept} (heatmaps)"
                if kept
                else "this run kept no queries/keys: heatmaps need `attnscope analyze ... --keep-qk`"
            ),
        ]
    )


def strip_view(
    store: RunStore, name: str | None, metric: str | None, layer: Any
) -> tuple[go.Figure, Any]:
    """The token strip of ``metric`` on one layer or all (``layer`` None: all)."""
    if name is None or metric is None:
        return figures.empty_figure(), None
    layer = ALL_LAYERS if layer is None else layer
    return figures.token_strip(load_run(store, name), metric, layer), None


def compare_view(
    store: RunStore, name: str | None, other: str | None, metric: str | None
) -> tuple[go.Figure, Any]:
    """Per-layer means of ``metric`` for the run and, if chosen, the run to compare with."""
    if name is None or metric is None:
        return figures.empty_figure(), None
    names = [name] + ([other] if other and other != name else [])
    return figures.layer_means_figure({n: load_run(store, n) for n in names}, metric), None


def token_view(
    store: RunStore, name: str | None, position: int | None, metric: str | None
) -> tuple[go.Figure, Any, Any]:
    """Layer x head maps at the clicked token, its table of values, and a title."""
    if name is None or metric is None:
        return figures.empty_figure(), None, None
    if position is None:
        return figures.empty_figure(), None, message("Click a token in the strip above.")
    trace = load_run(store, name)
    row_metric = metric if metric in trace.rows else next(iter(trace.rows))
    shown = [row_metric, *(m for m in (metric, *TOKEN_METRICS) if m in trace.cols)]
    return (
        figures.token_heads(trace, position, list(dict.fromkeys(shown))),
        token_table(token_summary(trace, position)),
        html.Div(
            f"token {position}: {trace.tokens[position]!r}", id="token-title", className="note"
        ),
    )


def default_head(store: RunStore, name: str) -> dict[str, int]:
    """The head shown before any click: head 0 of the first layer with stored q/k."""
    trace = load_run(store, name)
    return {"layer": (qk_layers(trace) or trace.layers)[0], "head": 0}


def head_view(
    store: RunStore, name: str | None, head: dict | None, metric: str | None
) -> tuple[go.Figure, Any]:
    """One head's curve of ``metric`` and a line of its head-grid numbers."""
    if name is None or head is None or metric is None:
        return figures.empty_figure(), None
    trace = load_run(store, name)
    layer, h = head["layer"], head["head"]
    stats = head_stats(trace, layer, h)
    groups = head_tags(trace)[layer_index(trace, layer)][h]
    line = f"layer {layer} head {h} ({', '.join(groups) or 'no group'}): " + ", ".join(
        f"{k} {fmt(v)}" for k, v in stats.items()
    )
    return figures.head_curve(trace, metric, layer, h), html.Div(
        line, id="head-title", className="note"
    )


def heatmap_view(
    store: RunStore, name: str | None, head: dict | None, start: int | None, size: int | None
) -> tuple[go.Figure, Any]:
    """The chosen head's attention over the chosen window of tokens, from stored q/k."""
    if name is None or head is None:
        return figures.empty_figure(), None
    window = attention_window(store, name, head["layer"], head["head"], start, size)
    return figures.attention_heatmap(window, load_run(store, name).tokens), None


def _pick_token(store: RunStore, name: str | None, click: dict | None) -> int | None:
    if name is None or ctx.triggered_id != "strip" or not click:
        return None
    return int(click["points"][0]["x"])


def _pick_head(store: RunStore, name: str | None, click: dict | None) -> dict | None:
    if name is None:
        return None
    if ctx.triggered_id != "head-grid" or not click:
        return default_head(store, name)
    point = click["points"][0]
    return {"layer": int(str(point["y"])[1:]), "head": int(str(point["x"])[1:])}


def register(app: Dash, store: RunStore) -> None:
    """Wire every view to the page; failures become messages on the page."""

    def wire(view: Callable, outputs: list, inputs: list, on_error: Callable) -> None:
        def callback(*args: Any) -> Any:
            try:
                return view(store, *args)
            except Exception as err:  # the page shows any failure instead of breaking
                if not isinstance(err, AttnscopeError):
                    log.exception("dashboard view %s failed", view.__name__)
                return on_error(message(page_text(store, error_text(err)), "error"))

        app.callback(outputs, inputs)(callback)

    empty = figures.empty_figure
    wire(
        run_view,
        [
            Output("run-info", "children"),
            Output("loaded", "data"),
            Output("metric", "options"),
            Output("metric", "value"),
            Output("layer", "options"),
            Output("layer", "value"),
            Output("head-grid", "figure"),
        ],
        [Input("run", "value"), State("metric", "value"), State("layer", "value")],
        lambda msg: (msg, None, [], None, [], None, empty()),
    )
    wire(
        strip_view,
        [Output("strip", "figure"), Output("strip-msg", "children")],
        [Input("loaded", "data"), Input("metric", "value"), Input("layer", "value")],
        lambda msg: (empty(), msg),
    )
    wire(
        compare_view,
        [Output("layer-means", "figure"), Output("compare-msg", "children")],
        [Input("loaded", "data"), Input("compare", "value"), Input("metric", "value")],
        lambda msg: (empty(), msg),
    )
    wire(
        _pick_token,
        Output("token", "data"),
        [Input("loaded", "data"), Input("strip", "clickData")],
        lambda msg: None,
    )
    wire(
        token_view,
        [
            Output("token-heads", "figure"),
            Output("token-table", "children"),
            Output("token-msg", "children"),
        ],
        [Input("loaded", "data"), Input("token", "data"), Input("metric", "value")],
        lambda msg: (empty(), None, msg),
    )
    wire(
        _pick_head,
        Output("head", "data"),
        [Input("loaded", "data"), Input("head-grid", "clickData")],
        lambda msg: None,
    )
    wire(
        head_view,
        [Output("head-curve", "figure"), Output("head-msg", "children")],
        [Input("loaded", "data"), Input("head", "data"), Input("metric", "value")],
        lambda msg: (empty(), msg),
    )
    wire(
        heatmap_view,
        [Output("heatmap", "figure"), Output("heatmap-msg", "children")],
        [
            Input("loaded", "data"),
            Input("head", "data"),
            Input("hm-start", "value"),
            Input("hm-size", "value"),
        ],
        lambda msg: (empty(), msg),
    )
