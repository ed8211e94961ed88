"""Page layout and the small HTML pieces the callbacks fill in."""

from __future__ import annotations

from dash import dcc, html
from dash.development.base_component import Component

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


def _graph(graph_id: str) -> dcc.Graph:
    return dcc.Graph(id=graph_id, config={"displayModeBar": "hover", "displaylogo": False})


def _labelled(label: str, component: Component, width: str = "260px") -> html.Div:
    return html.Div([html.Label(label), component], style={"width": width})


def build_layout(store: RunStore) -> html.Div:
    """The whole page, opened on the first readable run; runs are listed again on every page
    load, with the ones that cannot be read and why."""
    try:
        runs = list_runs(store)
    except AttnscopeError:
        runs = []  # the run callback shows the error
    options = [
        {"label": f"{r.name} ({r.model}, {r.n_tokens} tokens)", "value": r.name} for r in runs
    ]
    skipped = [message(page_text(store, line), "error") for line in skipped_lines(store)]
    return html.Div(
        [
            html.H2("attnscope explorer"),
            message(f"runs under {store.root.name}/"),
            html.Div(skipped, id="skipped"),
            html.Div(
                [
                    _labelled(
                        "run",
                        dcc.Dropdown(id="run", options=options, value=first_readable(store, runs)),
                    ),
                    _labelled(
                        "compare with",
                        dcc.Dropdown(id="compare", options=options, placeholder="(none)"),
                    ),
                    _labelled("metric", dcc.Dropdown(id="metric", clearable=False), "200px"),
                    _labelled("layer", dcc.Dropdown(id="layer", clearable=False), "140px"),
                ],
                style=ROW,
            ),
            html.Div(id="run-info"),
            html.Div(id="strip-msg"),
            _graph("strip"),
            html.H3("Token"),
            html.Div(id="token-msg"),
            html.Div(id="token-table"),
            _graph("token-heads"),
            html.H3("Layers"),
            html.Div(id="compare-msg"),
            _graph("layer-means"),
            html.H3("Heads"),
            _graph("head-grid"),
            html.Div(id="head-msg"),
            _graph("head-curve"),
            html.H3("Attention heatmap (from stored queries and keys)"),
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
                ],
                style=ROW,
            ),
            html.Div(id="heatmap-msg"),
            _graph("heatmap"),
            dcc.Store(id="loaded"),
            dcc.Store(id="token"),
            dcc.Store(id="head"),
        ],
        style={"fontFamily": "sans-serif", "margin": "12px 24px"},
    )
