"""Page layout and the small HTML pieces the callbacks fill in."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

from dash import dcc, html
from dash.development.base_component import Component
from flask import has_request_context, request

from attnscope.dashboard.data import (
    MAX_CELLS,
    TokenRow,
    first_readable,
    fmt,
    list_runs,
    page_text,
    skipped_lines,
)
from attnscope.errors import AttnscopeError
from attnscope.store import RunStore

ROW = {"display": "flex", "gap": "12px", "alignItems": "flex-end", "flexWrap": "wrap"}
STYLES = {
    "error": {"color": "#b00020", "whiteSpace": "pre-wrap", "margin": "6px 0"},
    "note": {"color": "#555", "margin": "6px 0"},
}


def message(text: str, kind: str = "note") -> html.Div:
    """A line of text for the page: ``kind`` is "note" or "error"."""
    return html.Div(text, className=kind, style=STYLES[kind])


def token_table(rows: list[TokenRow]) -> html.Table:
    """Every metric at the clicked token: mean over layers and heads, and the largest head."""
    header = html.Tr([html.Th(h) for h in ("metric", "kind", "mean", "max", "at")])
    body = [
        html.Tr(
            [
                html.Td(r.metric),
                html.Td(r.kind),
                html.Td(fmt(r.mean)),
                html.Td(fmt(r.max)),
                html.Td(f"L{r.at[0]} h{r.at[1]}"),
            ]
        )
        for r in rows
    ]
    return html.Table([header, *body], style={"borderSpacing": "12px 2px", "fontSize": "14px"})


GRAPHS = {  # every graph of the page, as the export menu names it
    "strip": "token strip",
    "attend": "where the token attends (one layer)",
    "destinations": "where the token attends (every layer and head)",
    "token-heads": "token statistics per head",
    "head-grid": "head grid",
    "overview": "head overview",
    "head-curve": "head curve",
    "heatmap": "attention heatmap",
    "head-lines": "head view",
    "layer-means": "per-layer means",
    "compare-grids": "comparison: head grids",
    "compare-strips": "comparison: token strips",
    "compare-heatmaps": "comparison: heatmaps",
}
HEATMAP_OPTIONS = [
    {"label": "log scale", "value": "log"},
    {"label": "hide the sink column (key 0)", "value": "nosink"},
    {"label": "renormalise rows to the window", "value": "renorm"},
]


def _graph(graph_id: str) -> dcc.Graph:
    return dcc.Graph(
        id=graph_id,
        config={"displayModeBar": "hover", "displaylogo": False},
        style={"display": "none"},  # shown once it holds a figure
    )


def _labelled(label: str, component: Component, width: str = "260px") -> html.Div:
    return html.Div([html.Label(label), component], style={"width": width})


def wanted_state() -> dict[str, Any]:
    """The run, layer, head, token and head score a linked URL asks for (``?run=..&layer=..
    &head=..&token=..&score=..``), read from the page request that loads the layout."""
    if not has_request_context() or not request.referrer:
        return {}
    query = parse_qs(urlparse(request.referrer).query)
    state: dict[str, Any] = {}
    for key in ("run", "layer", "head", "token", "score"):
        if query.get(key):
            value = query[key][0]
            text = key in ("run", "score")
            state[key] = value if text else (int(value) if value.isdigit() else None)
    return state


def build_layout(store: RunStore) -> html.Div:
    """The whole page, opened on the run a linked URL names or the first readable run; runs are
    listed again on every page load, with the ones that cannot be read and why."""
    try:
        runs = list_runs(store)
    except AttnscopeError:
        runs = []  # the run callback shows the error
    options = [
        {"label": f"{r.name} ({r.model}, {r.n_tokens} tokens)", "value": r.name} for r in runs
    ]
    wanted = wanted_state()
    first = wanted.get("run") if wanted.get("run") in {r.name for r in runs} else None
    skipped = [message(page_text(store, line), "error") for line in skipped_lines(store)]
    return html.Div(
        [
            dcc.Location(id="url", refresh=False),
            html.H2("attnscope explorer"),
            message(f"runs under {store.root.name}/"),
            html.Div(skipped, id="skipped"),
            html.Div(
                [
                    _labelled(
                        "run",
                        dcc.Dropdown(
                            id="run", options=options, value=first or first_readable(store, runs)
                        ),
                    ),
                    _labelled(
                        "compare with",
                        dcc.Dropdown(id="compare", options=options, placeholder="(none)"),
                    ),
                    _labelled("metric", dcc.Dropdown(id="metric", clearable=False), "200px"),
                    _labelled("strip layer", dcc.Dropdown(id="layer", clearable=False), "140px"),
                ],
                style=ROW,
            ),
            html.Div(id="run-info"),
            html.Div(id="strip-msg"),
            _graph("strip"),
            html.H3("Where does this token attend?"),
            html.Div(id="token-msg"),
            html.Div(id="attend-msg"),
            _graph("attend"),
            html.Div(id="destinations-msg"),
            _graph("destinations"),
            html.Details(
                [
                    html.Summary("statistics of the token"),
                    html.Div(id="token-table"),
                    _graph("token-heads"),
                ],
                open=True,
            ),
            html.H3("Heads"),
            html.Div(
                _labelled(
                    "colour heads by", dcc.Dropdown(id="head-score", clearable=False), "360px"
                ),
                style=ROW,
            ),
            html.Div(id="head-grid-msg"),
            _graph("head-grid"),
            html.Div(id="head-msg"),
            _graph("head-curve"),
            html.Div(id="overview-msg"),
            _graph("overview"),
            html.H3("Attention of the selected head"),
            html.Div(
                [
                    _labelled(
                        "first token",
                        dcc.Input(id="hm-start", type="number", min=0, value=0, debounce=True),
                        "140px",
                    ),
                    _labelled(
                        "tokens",
                        dcc.Input(
                            id="hm-size", type="number", min=1, value=MAX_CELLS, debounce=True
                        ),
                        "140px",
                    ),
                    dcc.Checklist(
                        id="hm-options", options=HEATMAP_OPTIONS, value=["log"], inline=True
                    ),
                ],
                style=ROW,
            ),
            html.Div(id="heatmap-msg"),
            html.Div(
                [
                    _graph("heatmap"),
                    html.Div(
                        [html.Div(id="lines-msg"), _graph("head-lines")],
                        style={"maxWidth": "540px"},
                    ),
                ],
                style={"display": "grid", "gridTemplateColumns": "minmax(0, 1fr) auto"},
            ),
            html.H3("Layers and run comparison"),
            html.Div(id="compare-msg"),
            _graph("layer-means"),
            _graph("compare-strips"),
            _graph("compare-grids"),
            _graph("compare-heatmaps"),
            html.H3("Export"),
            html.Div(
                [
                    _labelled(
                        "view",
                        dcc.Dropdown(
                            id="export-view",
                            options=[{"label": v, "value": k} for k, v in GRAPHS.items()],
                            value="heatmap",
                            clearable=False,
                        ),
                        "320px",
                    ),
                    html.Button("data (CSV)", id="export-csv"),
                    html.Button("data (Parquet)", id="export-parquet"),
                    html.Button("figure (PNG)", id="export-png"),
                ],
                style=ROW,
            ),
            html.Div(id="export-msg"),
            dcc.Download(id="download"),
            dcc.Store(id="loaded"),
            dcc.Store(id="token"),
            dcc.Store(id="head"),
            dcc.Store(id="wanted", data=wanted),
        ],
        style={"fontFamily": "sans-serif", "margin": "12px 24px"},
    )
