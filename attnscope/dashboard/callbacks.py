"""Views (plain functions of the store and the page's inputs) and their Dash wiring.

The ``loaded`` store holds the name of the run that loaded without error; every other view
starts from it, so a broken run shows one error (in the run info) instead of one per view.
Graphs whose figure is empty are hidden (no stray mode bar).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import plotly.graph_objects as go
from dash import Dash, Input, Output, State, ctx, dcc, html

from attnscope.dashboard import attend, compare, figures
from attnscope.dashboard.data import (
    ALL_LAYERS,
    attention_window,
    clamp_window,
    empty_root_message,
    error_text,
    fmt,
    head_stats,
    head_tags,
    layer_index,
    list_runs,
    load_run,
    load_scores,
    page_text,
    token_summary,
)
from attnscope.dashboard.export import export_bytes
from attnscope.dashboard.layout import GRAPHS, message, token_table
from attnscope.errors import AttnscopeError
from attnscope.headtable import score_title
from attnscope.patterns import attention_kind
from attnscope.store import RunStore
from attnscope.trace import Trace

log = logging.getLogger(__name__)
TOKEN_METRICS = ("fai", "received")  # column metrics shown next to the chosen row metric
OVERVIEW = "overview"  # "colour heads by": the head grid's overview panels, not one head score


def _shown(trace: Trace, metrics: list[str]) -> list[str]:
    hidden = attend.hidden_metrics(trace)
    return [m for m in metrics if m not in hidden]


def run_view(
    store: RunStore, name: str | None, metric: str | None, layer: Any
) -> tuple[html.Div, str | None, list[dict], str | None, list[dict], Any]:
    """Run info, ``loaded``, metric options/value, layer options/value."""
    if name is None:
        text = "Pick a run." if list_runs(store) else empty_root_message(store)
        return message(text), None, [], None, [], None
    trace = load_run(store, name)
    rows, cols = _shown(trace, list(trace.rows)), _shown(trace, list(trace.cols))
    metric_options = [{"label": f"{m} (row)", "value": m} for m in rows] + [
        {"label": f"{m} (column)", "value": m} for m in cols
    ]
    layer_options = [{"label": "all", "value": ALL_LAYERS}] + [
        {"label": str(layer), "value": layer} for layer in trace.layers
    ]
    metrics = rows + cols
    metric = metric if metric in metrics else ("entropy" if "entropy" in metrics else metrics[0])
    layer = layer if layer in trace.layers else ALL_LAYERS
    return _run_info(store, name, trace), name, metric_options, metric, layer_options, layer


def _run_info(store: RunStore, name: str, trace: Trace) -> html.Div:
    """Model, kind, sizes, spans, the text, which layers kept q/k and what is hidden."""
    meta = trace.meta
    kind = attention_kind(trace)
    text = str(meta.get("text", ""))
    if meta.get("generated_text"):
        text += f"[{meta['generated_text']}]"
    notes = []
    if attend.speech_maps(store, name):
        notes.append("speech run: cross-attention of each output token over the audio frames")
    elif attend.kept(trace) == list(trace.layers):
        notes.append("queries/keys kept for every layer: every view works in every layer")
    else:
        notes.append(attend.keep_more(trace))
    hidden = attend.hidden_metrics(trace)
    if hidden:
        notes.append(
            f"{kind} attention: causal-only metrics ({', '.join(hidden)}) are hidden; distances "
            "are |t - s|" + (" (keys: audio frames)" if kind == "cross" else "")
        )
    return html.Div(
        [
            html.B(name),
            f": model {meta.get('model', '?')} ({meta.get('kind', '?')}, {kind} attention), "
            f"{len(trace)} tokens, {len(trace.layers)} layers x {trace.n_heads} heads, spans "
            f"{trace.spans}",
            html.Div(text[:600], style={"fontFamily": "monospace", "margin": "4px 0"}),
            *(message(n) for n in notes),
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


def token_view(
    store: RunStore, name: str | None, position: int | None, metric: str | None
) -> tuple[go.Figure, Any, Any]:
    """Layer x head maps of the statistics at the clicked token, its table, and a title."""
    if name is None or metric is None:
        return figures.empty_figure(), None, None
    if position is None:
        return figures.empty_figure(), None, message("Click a token in the strip above.")
    trace = load_run(store, name)
    row_metric = metric if metric in trace.rows else next(iter(trace.rows))
    shown = [row_metric, *(m for m in (metric, *TOKEN_METRICS) if m in trace.cols)]
    shown = _shown(trace, list(dict.fromkeys(shown)))
    rows = [r for r in token_summary(trace, position) if r.metric in _shown(trace, [r.metric])]
    return (
        figures.token_heads(trace, position, shown),
        token_table(rows),
        html.Div(
            f"token {figures.quoted(trace.tokens)[position]}", id="token-title", className="note"
        ),
    )


def attend_view(
    store: RunStore, name: str | None, position: int | None, head: dict | None, options: list
) -> tuple[go.Figure, Any]:
    """Where the clicked token attends in the selected head's layer: that head's row and every
    head of the layer."""
    if name is None or head is None:
        return figures.empty_figure(), None
    if position is None:
        return figures.empty_figure(), message(
            "Click a token in the strip to see where it attends."
        )
    trace = load_run(store, name)
    rows, visible = attend.attention_rows(store, name, head["layer"], [position])
    fig = figures.attend_figure(
        rows[:, 0],
        visible[0],
        trace.tokens,
        position,
        head["layer"],
        head["head"],
        attend.key_labels(store, name),
        log="log" in (options or []),
    )
    return fig, None


def destinations_view(
    store: RunStore, name: str | None, position: int | None
) -> tuple[go.Figure, Any]:
    """Layer x head grid of where the clicked token's attention goes."""
    if name is None or position is None:
        return figures.empty_figure(), None
    trace = load_run(store, name)
    dest = attend.destinations(store, name, position)
    note = message(attend.keep_more(trace)) if dest.missing else None
    fig = figures.destinations_figure(dest, trace.tokens, attend.key_labels(store, name))
    return fig, note


def default_head(store: RunStore, name: str) -> dict[str, int]:
    """The head shown before any click: head 0 of the first layer whose rows can be rebuilt."""
    trace = load_run(store, name)
    return {"layer": (attend.row_layers(store, name) or trace.layers)[0], "head": 0}


def score_view(
    store: RunStore, name: str | None, current: str | None, wanted: dict | None
) -> tuple[list[dict], str | None]:
    """The "colour heads by" options of the run (its overview panels, then each head score it
    has) and the choice: the current one when the run has it, else the one a linked URL asks
    for, else the overview."""
    if name is None:
        return [], None
    panels = ", ".join(t.split(" (")[0] for t in figures.head_panels(load_run(store, name)))
    options = [{"label": f"overview: {panels}", "value": OVERVIEW}] + [
        {"label": score_title(s), "value": s} for s in load_scores(store, name)
    ]
    if current is None and wanted and wanted.get("run") == name:
        current = wanted.get("score")
    return options, current if current in [o["value"] for o in options] else OVERVIEW


def head_grid_view(
    store: RunStore, name: str | None, head: dict | None, score: str | None
) -> tuple[go.Figure, Any]:
    """The head grid: the overview panels, or the heads coloured by the head score ``score``."""
    if name is None:
        return figures.empty_figure(), None
    scores = load_scores(store, name)
    chosen = score if score in scores else None  # a run just picked may lack the last score
    return figures.head_grid(load_run(store, name), head, chosen, scores), None


def head_view(
    store: RunStore, name: str | None, head: dict | None, metric: str | None
) -> tuple[go.Figure, Any]:
    """One head's curve of ``metric`` and a line of its head-grid numbers."""
    if name is None or head is None or metric is None:
        return figures.empty_figure(), None
    trace = load_run(store, name)
    layer, h = head["layer"], head["head"]
    stats = head_stats(trace, layer, h)
    groups = head_tags(trace)[layer_index(trace, layer)][h] if stats.get("head span") else ()
    line = f"layer {layer} head {h} ({', '.join(groups) or 'no group'}): " + ", ".join(
        f"{k} {fmt(v)}" for k, v in stats.items()
    )
    return figures.head_curve(trace, metric, layer, h), html.Div(
        line, id="head-title", className="note"
    )


def overview_view(
    store: RunStore, name: str | None, head: dict | None, start: int | None, size: int | None
) -> tuple[go.Figure, Any]:
    """Thumbnails of every head's pattern over the heatmap's window."""
    if name is None:
        return figures.empty_figure(), None
    trace = load_run(store, name)
    thumbs, layers = attend.thumbnails(store, name, start, size, figures.THUMB)
    if not thumbs:
        return figures.empty_figure(), message(attend.keep_more(trace))
    note = None if layers == list(trace.layers) else message(attend.keep_more(trace))
    return figures.head_overview(thumbs, layers, trace.n_heads, head), note


def heatmap_view(
    store: RunStore,
    name: str | None,
    head: dict | None,
    start: int | None,
    size: int | None,
    options: list | None,
    position: int | None,
) -> tuple[go.Figure, Any]:
    """The chosen head's attention over the chosen window (tokens x frames for speech)."""
    if name is None or head is None:
        return figures.empty_figure(), None
    options = options or []
    trace = load_run(store, name)
    if attend.speech_maps(store, name):
        rows, _ = attend.attention_rows(store, name, head["layer"], range(len(trace)))
        fig = figures.cross_heatmap(
            rows[head["head"]],
            trace.tokens,
            attend.frame_seconds(store, name),
            attend.speech_features(store, name),
            head["layer"],
            head["head"],
            log="log" in options,
            token=position,
        )
        return fig, None
    if head["layer"] not in trace.qk:
        return figures.empty_figure(), message(attend.keep_more(trace, head["layer"]))
    window = attention_window(store, name, head["layer"], head["head"], start, size)
    fig = figures.attention_heatmap(
        window,
        trace.tokens,
        log="log" in options,
        hide_sink="nosink" in options,
        renormalise="renorm" in options,
        token=position,
    )
    return fig, None


def lines_view(
    store: RunStore,
    name: str | None,
    head: dict | None,
    start: int | None,
    size: int | None,
    position: int | None,
) -> tuple[go.Figure, Any]:
    """bertviz-style head view of the window's first ``LINE_VIEW_TOKENS`` tokens."""
    if name is None or head is None:
        return figures.empty_figure(), None
    trace = load_run(store, name)
    if attend.speech_maps(store, name):
        return figures.empty_figure(), message(
            "head view: for self-attention runs (a speech run's keys are audio frames; see the "
            "tokens x frames map above)"
        )
    if head["layer"] not in trace.qk:
        return figures.empty_figure(), message(attend.keep_more(trace, head["layer"]))
    first, end = clamp_window(len(trace), start, size)
    n = min(end - first, figures.LINE_VIEW_TOKENS)
    window = attention_window(store, name, head["layer"], head["head"], first, n)
    fig = figures.head_lines(
        window.matrix, first, trace.tokens, head["layer"], head["head"], position
    )
    note = None
    if end - first > n:
        note = message(f"head view: first {n} tokens of the window (set 'tokens' to {n} or less)")
    return fig, note


def compare_view(
    store: RunStore,
    name: str | None,
    other: str | None,
    metric: str | None,
    head: dict | None,
    start: int | None,
    size: int | None,
) -> tuple[go.Figure, go.Figure, go.Figure, go.Figure, Any]:
    """Per-layer means of the run (and the run to compare with), and with a second run: head
    grids, token strips and the chosen head's heatmaps side by side with their difference."""
    empty = figures.empty_figure
    if name is None or metric is None:
        return empty(), empty(), empty(), empty(), None
    a = load_run(store, name)
    if not other or other == name:
        return compare.layer_lines({name: a}, metric), empty(), empty(), empty(), None
    b = load_run(store, other)
    names = (name, other)
    if metric not in {*b.rows, *b.cols}:
        return (
            empty(),
            empty(),
            empty(),
            empty(),
            message(f"{other} has no metric {metric!r}: pick one both runs have"),
        )
    lines = compare.layer_lines({name: a, other: b}, metric)
    grids = compare.head_grids(a, b, names, metric)
    strips = compare.strips(a, b, names, metric)
    pair, note = empty(), None
    if head is not None and head["layer"] in attend.kept(a):
        b_layer = b.layers[compare.matched_layers(a, b)[layer_index(a, head["layer"])]]
        if b_layer in attend.kept(b) and head["head"] < b.n_heads:
            first, end = clamp_window(min(len(a), len(b)), start, size)
            wa = attention_window(store, name, head["layer"], head["head"], first, end - first)
            wb = attention_window(store, other, b_layer, head["head"], first, end - first)
            pair = compare.heatmap_pair(
                wa.matrix,
                wb.matrix,
                (f"{name} L{head['layer']}", f"{other} L{b_layer}"),
                f"head {head['head']}: attention over tokens {first}-{end - 1} in both runs",
            )
        else:
            note = message(f"{other}: {attend.keep_more(b, b_layer)}")
    return lines, grids, strips, pair, note


def _pick_token(
    store: RunStore, name: str | None, click: dict | None, wanted: dict | None
) -> int | None:
    if name is None:
        return None
    if ctx.triggered_id == "strip" and click:
        return int(click["points"][0]["x"])
    if wanted and wanted.get("run") == name and wanted.get("token") is not None:
        return (
            int(wanted["token"]) if 0 <= int(wanted["token"]) < len(load_run(store, name)) else None
        )
    return None


def _pick_head(
    store: RunStore,
    name: str | None,
    grid: dict | None,
    overview: dict | None,
    dest: dict | None,
    wanted: dict | None,
) -> dict | None:
    if name is None:
        return None
    trigger = ctx.triggered_id
    click = {"head-grid": grid, "overview": overview, "destinations": dest}.get(trigger)
    if click:
        point = click["points"][0]
        if trigger == "overview":
            layers = attend.row_layers(store, name)
            cell = figures.THUMB + 1
            return {"layer": layers[int(point["y"]) // cell], "head": int(point["x"]) // cell}
        return {"layer": int(str(point["y"]).lstrip("L")), "head": int(str(point["x"])[1:])}
    if wanted and wanted.get("run") == name and wanted.get("layer") is not None:
        trace = load_run(store, name)
        layer, head = int(wanted["layer"]), int(wanted.get("head") or 0)
        if layer in trace.layers and 0 <= head < trace.n_heads:
            return {"layer": layer, "head": head}
    return default_head(store, name)


def _url(
    store: RunStore,
    name: str | None,
    head: dict | None,
    token: int | None,
    score: str | None = None,
) -> str:
    """The page's query string: run, layer, head, token and the head score colouring the head
    grid (none for the overview), so a view can be linked."""
    if name is None:
        return ""
    state: dict[str, Any] = {"run": name}
    if head:
        state.update(layer=head["layer"], head=head["head"])
    if token is not None:
        state["token"] = token
    if score and score != OVERVIEW:
        state["score"] = score
    return "?" + urlencode(state)


def _export(
    store: RunStore, csv: Any, parquet: Any, png: Any, graph: str | None, *figs: dict | None
) -> Any:
    fmt_ = {"export-csv": "csv", "export-parquet": "parquet", "export-png": "png"}.get(
        ctx.triggered_id
    )
    if fmt_ is None or graph is None:
        return None, None
    fig = dict(zip(GRAPHS, figs, strict=True))[graph]
    if not fig or not fig.get("data"):
        return None, message(f"the {graph} view is empty: nothing to export", "error")
    data = export_bytes(fig, fmt_)
    return dcc.send_bytes(data, f"{graph}.{fmt_}"), message(f"exported {graph}.{fmt_}")


def register(app: Dash, store: RunStore) -> None:
    """Wire every view to the page; failures become messages on the page; graphs whose figure
    is empty are hidden."""

    def wire(view: Callable, outputs: list, inputs: list, on_error: Callable) -> None:
        outputs = outputs if isinstance(outputs, list) else [outputs]
        graphs = [i for i, o in enumerate(outputs) if o.component_property == "figure"]
        styles = [Output(outputs[i].component_id, "style") for i in graphs]

        def callback(*args: Any) -> Any:
            try:
                result = view(store, *args)
            except Exception as err:  # the page shows any failure instead of breaking
                if not isinstance(err, AttnscopeError):
                    log.exception("dashboard view %s failed", view.__name__)
                result = on_error(message(page_text(store, error_text(err)), "error"))
            result = list(result) if isinstance(result, tuple) else [result]
            shown = [{} if result[i].data else {"display": "none"} for i in graphs]
            out = result + shown
            return out if len(out) > 1 else out[0]

        app.callback([*outputs, *styles] if len(outputs) + len(styles) > 1 else outputs[0], inputs)(
            callback
        )

    empty = figures.empty_figure
    loaded = Input("loaded", "data")
    head = Input("head", "data")
    token = Input("token", "data")
    window = [Input("hm-start", "value"), Input("hm-size", "value")]
    options = Input("hm-options", "value")
    wire(
        run_view,
        [
            Output("run-info", "children"),
            Output("loaded", "data"),
            Output("metric", "options"),
            Output("metric", "value"),
            Output("layer", "options"),
            Output("layer", "value"),
        ],
        [Input("run", "value"), State("metric", "value"), State("layer", "value")],
        lambda msg: (msg, None, [], None, [], None),
    )
    wire(
        strip_view,
        [Output("strip", "figure"), Output("strip-msg", "children")],
        [loaded, Input("metric", "value"), Input("layer", "value")],
        lambda msg: (empty(), msg),
    )
    wire(
        _pick_token,
        Output("token", "data"),
        [loaded, Input("strip", "clickData"), State("wanted", "data")],
        lambda msg: None,
    )
    wire(
        _pick_head,
        Output("head", "data"),
        [
            loaded,
            Input("head-grid", "clickData"),
            Input("overview", "clickData"),
            Input("destinations", "clickData"),
            State("wanted", "data"),
        ],
        lambda msg: None,
    )
    wire(
        token_view,
        [
            Output("token-heads", "figure"),
            Output("token-table", "children"),
            Output("token-msg", "children"),
        ],
        [loaded, token, Input("metric", "value")],
        lambda msg: (empty(), None, msg),
    )
    wire(
        attend_view,
        [Output("attend", "figure"), Output("attend-msg", "children")],
        [loaded, token, head, options],
        lambda msg: (empty(), msg),
    )
    wire(
        destinations_view,
        [Output("destinations", "figure"), Output("destinations-msg", "children")],
        [loaded, token],
        lambda msg: (empty(), msg),
    )
    wire(
        score_view,
        [Output("head-score", "options"), Output("head-score", "value")],
        [loaded, State("head-score", "value"), State("wanted", "data")],
        lambda msg: ([], None),
    )
    wire(
        head_grid_view,
        [Output("head-grid", "figure"), Output("head-grid-msg", "children")],
        [loaded, head, Input("head-score", "value")],
        lambda msg: (empty(), msg),
    )
    wire(
        head_view,
        [Output("head-curve", "figure"), Output("head-msg", "children")],
        [loaded, head, Input("metric", "value")],
        lambda msg: (empty(), msg),
    )
    wire(
        overview_view,
        [Output("overview", "figure"), Output("overview-msg", "children")],
        [loaded, head, *window],
        lambda msg: (empty(), msg),
    )
    wire(
        heatmap_view,
        [Output("heatmap", "figure"), Output("heatmap-msg", "children")],
        [loaded, head, *window, options, token],
        lambda msg: (empty(), msg),
    )
    wire(
        lines_view,
        [Output("head-lines", "figure"), Output("lines-msg", "children")],
        [loaded, head, *window, token],
        lambda msg: (empty(), msg),
    )
    wire(
        compare_view,
        [
            Output("layer-means", "figure"),
            Output("compare-grids", "figure"),
            Output("compare-strips", "figure"),
            Output("compare-heatmaps", "figure"),
            Output("compare-msg", "children"),
        ],
        [loaded, Input("compare", "value"), Input("metric", "value"), head, *window],
        lambda msg: (empty(), empty(), empty(), empty(), msg),
    )
    wire(
        _url,
        Output("url", "search"),
        [loaded, head, token, Input("head-score", "value")],
        lambda msg: "",
    )
    wire(
        _export,
        [Output("download", "data"), Output("export-msg", "children")],
        [
            Input("export-csv", "n_clicks"),
            Input("export-parquet", "n_clicks"),
            Input("export-png", "n_clicks"),
            State("export-view", "value"),
            *(State(g, "figure") for g in GRAPHS),
        ],
        lambda msg: (None, msg),
    )
