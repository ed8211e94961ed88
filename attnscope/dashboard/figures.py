"""Plotly figures of the explorer; the head grid is ``report.head_maps`` with group marks."""

from __future__ import annotations

from html import escape

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attnscope import metrics
from attnscope.dashboard.data import (
    ALL_LAYERS,
    Window,
    check_position,
    head_tags,
    layer_index,
    layer_means,
    metric_values,
    token_values,
)
from attnscope.report import head_maps
from attnscope.trace import Trace

TOKEN_TICKS = 64  # at most this many tokens: label the axis with the tokens themselves
# Plotly reads labels as HTML-like markup, so tokens such as "<s>" are escaped (escape()).
GROUP_MARKS = {"local": "loc", "global": "glob", "sink": "sink"}
MARGIN = dict(l=50, r=20, t=50, b=40)


def empty_figure() -> go.Figure:
    """A blank placeholder (the message goes in the text next to it)."""
    fig = go.Figure()
    fig.update_layout(
        xaxis_visible=False,
        yaxis_visible=False,
        height=40,
        margin=dict(l=0, r=0, t=0, b=0, autoexpand=False),  # else plotly fails after a heatmap
        plot_bgcolor="rgba(0,0,0,0)",
        paper_bgcolor="rgba(0,0,0,0)",
    )
    return fig


def token_strip(trace: Trace, metric: str, layer: int | str = ALL_LAYERS) -> go.Figure:
    """One cell per token coloured by ``metric`` averaged over heads (and layers); clickable."""
    values = token_values(trace, metric, layer).numpy()
    where = "all layers" if layer == ALL_LAYERS else f"layer {layer}"
    fig = go.Figure(
        go.Heatmap(
            z=[values],
            x=np.arange(len(values)),
            text=[[f"{i}: {escape(t)}" for i, t in enumerate(trace.tokens)]],
            colorscale="Viridis",
            hovertemplate=f"%{{text}}<br>{metric} = %{{z:.4f}}<extra></extra>",
            colorbar=dict(title=dict(text=metric), thickness=12),
        )
    )
    _mark_spans(fig, trace)
    _token_axis(fig, trace.tokens, "x")
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(
        title=f"{metric}: mean over heads, {where} (click a token)", height=230, margin=MARGIN
    )
    return fig


def layer_means_figure(traces: dict[str, Trace], metric: str) -> go.Figure:
    """Per-layer mean of ``metric`` for each run, one line per run (run comparison)."""
    fig = go.Figure(
        [
            go.Scatter(
                x=trace.layers,
                y=layer_means(trace, metric).numpy(),
                mode="lines+markers",
                name=name,
                hovertemplate=f"{name} layer %{{x}}: %{{y:.4f}}<extra></extra>",
            )
            for name, trace in traces.items()
        ]
    )
    fig.update_layout(
        title=f"{metric}: mean over heads and tokens, per layer",
        xaxis_title="layer",
        yaxis_title=metric,
        height=300,
        margin=MARGIN,
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


def token_heads(trace: Trace, position: int, metrics: list[str]) -> go.Figure:
    """Layer x head maps of ``metrics`` at one token."""
    check_position(trace, position)
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics, horizontal_spacing=0.08)
    for col, name in enumerate(metrics, start=1):
        fig.add_trace(
            go.Heatmap(
                z=metric_values(trace, name)[..., position].numpy(),
                x=[f"h{h}" for h in range(trace.n_heads)],
                y=[f"L{layer}" for layer in trace.layers],
                colorscale="Magma",
                hovertemplate=f"%{{y}} %{{x}}: {name} = %{{z:.4f}}<extra></extra>",
            ),
            row=1,
            col=col,
        )
    _colorbars_beside(fig)
    fig.update_layout(
        title=f"token {position} {escape(repr(trace.tokens[position]))} in every layer and head",
        height=_grid_height(trace),
        margin=MARGIN,
    )
    return fig


def head_grid(trace: Trace) -> go.Figure:
    """``report.head_maps`` (head span, mean entropy, sink score) with each head's groups."""
    fig = head_maps(trace)
    tags = head_tags(trace)
    x, y, text = [], [], []
    for li, layer_tags in enumerate(tags):
        for h, groups in enumerate(layer_tags):
            if groups:  # unmarked heads get no point: plotly mis-draws empty texts on update
                x.append(f"h{h}")
                y.append(f"L{trace.layers[li]}")
                text.append(" ".join(GROUP_MARKS[g] for g in groups))
    for col in range(1, 4):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                text=text,
                mode="text",
                textfont=dict(color="white", size=10, shadow="1px 1px 2px black"),
                hoverinfo="skip",
                showlegend=False,
            ),
            row=1,
            col=col,
        )
    _colorbars_beside(fig)
    fig.update_layout(
        title=f"Heads: loc/glob = bottom/top {metrics.HEAD_GROUP_FRACTION:.0%} by head span, "
        f"sink = alpha_0 > {metrics.SINK_EPS} (click a head)",
        height=_grid_height(trace),
        margin=MARGIN,
    )
    return fig


def head_curve(trace: Trace, metric: str, layer: int, head: int) -> go.Figure:
    """``metric`` of one head over the tokens."""
    values = metric_values(trace, metric)[layer_index(trace, layer), head].numpy()
    fig = go.Figure(
        go.Scatter(
            x=np.arange(len(values)),
            y=values,
            customdata=[escape(t) for t in trace.tokens],
            mode="lines",
            hovertemplate=f"%{{x}}: %{{customdata}}<br>{metric} = %{{y:.4f}}<extra></extra>",
        )
    )
    _mark_spans(fig, trace)
    fig.update_layout(
        title=f"{metric} of layer {layer} head {head} per token",
        xaxis_title="token",
        yaxis_title=metric,
        height=280,
        margin=MARGIN,
    )
    return fig


def attention_heatmap(window: Window, tokens: list[str]) -> go.Figure:
    """The pooled attention of a window: queries down, keys across, block starts on the axes."""
    n_rows, n_cols = window.matrix.shape
    title = (
        f"layer {window.layer} head {window.head}: attention over tokens "
        f"{window.start}-{window.end - 1}"
    )
    if window.pool > 1:
        title += f", mean of {window.pool}x{window.pool} blocks"
    if not window.exact:
        title += f" (estimated from {window.sampled_rows} of {window.pool} evenly spaced query rows per block)"
    fig = go.Figure(
        go.Heatmap(
            z=window.matrix.numpy(),
            x=window.start + window.pool * np.arange(n_cols),
            y=window.start + window.pool * np.arange(n_rows),
            colorscale="Viridis",
            zmin=0,
            hovertemplate="query %{y}, key %{x}: %{z:.4f}<extra></extra>",
            colorbar=dict(thickness=12),
        )
    )
    if window.pool == 1:
        for axis in ("x", "y"):
            _token_axis(fig, tokens[window.start : window.end], axis, offset=window.start)
    fig.update_yaxes(autorange="reversed", title="query")
    fig.update_xaxes(title="key")
    fig.update_layout(title=title, height=620, margin=MARGIN)
    return fig


def _token_axis(fig: go.Figure, tokens: list[str], axis: str, offset: int = 0) -> None:
    """Label a position axis with the tokens when there are few enough to read."""
    if len(tokens) <= TOKEN_TICKS:
        fig.update_layout(
            {
                f"{axis}axis": dict(
                    tickvals=list(range(offset, offset + len(tokens))),
                    ticktext=[escape(t) for t in tokens],
                    tickfont=dict(size=9),
                )
            }
        )


def _colorbars_beside(fig: go.Figure) -> None:
    """Each heatmap's colour bar just right of its own panel (subplots side by side)."""
    for trace in fig.select_traces(selector=dict(type="heatmap")):
        axis = "xaxis" + (trace.xaxis or "x")[1:]
        right = fig.layout[axis].domain[1]
        trace.colorbar.update(x=right + 0.005, len=0.9, thickness=10, xanchor="left")


def _mark_spans(fig: go.Figure, trace: Trace) -> None:
    for name, (start, _) in trace.spans.items():
        if start > 0:
            fig.add_vline(x=start - 0.5, line_dash="dot", line_color="red", annotation_text=name)


def _grid_height(trace: Trace) -> int:
    return max(260, 110 + 24 * len(trace.layers))
