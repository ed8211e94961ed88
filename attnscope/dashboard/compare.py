"""Two runs side by side and their difference: per-layer means, layer x head grids and token
strips, with layers matched by relative depth when the runs have different layer counts."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from attnscope.dashboard.data import layer_means, metric_values, token_values
from attnscope.dashboard.figures import MARGIN, grid_panels, quoted
from attnscope.errors import AttnscopeError
from attnscope.trace import Trace


def depth(n_layers: int) -> np.ndarray:
    """Relative depth of each of ``n_layers`` captured layers: 0 (first) to 1 (last)."""
    return np.linspace(0, 1, n_layers) if n_layers > 1 else np.zeros(1)


def matched_layers(a: Trace, b: Trace) -> list[int]:
    """For each layer index of ``a``, the index of ``b``'s layer at the nearest relative depth
    (the identity when both have as many layers)."""
    da, db = depth(len(a.layers)), depth(len(b.layers))
    return [int(np.abs(db - d).argmin()) for d in da]


def _check_metric(metric: str, *traces: Trace) -> None:
    for trace in traces:
        if metric not in trace.rows and metric not in trace.cols:
            raise AttnscopeError(
                f"run of {trace.meta.get('model', '?')} has no metric {metric!r}; pick a metric "
                "both runs have"
            )


def layer_lines(traces: dict[str, Trace], metric: str) -> go.Figure:
    """Per-layer mean of ``metric`` of each run; on relative depth when the layer counts
    differ."""
    same = len({len(t.layers) for t in traces.values()}) == 1
    fig = go.Figure(
        [
            go.Scatter(
                x=trace.layers if same else depth(len(trace.layers)),
                y=layer_means(trace, metric).numpy(),
                customdata=trace.layers,
                mode="lines+markers",
                name=name,
                hovertemplate=f"{name} layer %{{customdata}}: %{{y:.4f}}<extra></extra>",
            )
            for name, trace in traces.items()
        ]
    )
    fig.update_layout(
        title=f"{metric}: mean over heads and tokens, per layer",
        xaxis=dict(
            title="layer" if same else "relative depth (layer / last layer)",
            dtick=1 if same else 0.1,
        ),
        yaxis_title=metric,
        height=320,
        margin=MARGIN,
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


def head_grids(a: Trace, b: Trace, names: tuple[str, str], metric: str) -> go.Figure:
    """Layer x head means of ``metric`` of both runs on ``a``'s layers (``b``'s matched by
    relative depth) and ``a - b`` when the head counts agree."""
    _check_metric(metric, a, b)
    rows = matched_layers(a, b)
    za = torch.nanmean(metric_values(a, metric), -1)  # [La, H]
    zb = torch.nanmean(metric_values(b, metric), -1)[rows]  # [La, Hb]
    panels = {names[0]: za, f"{names[1]} (layers {[b.layers[r] for r in rows]})": zb}
    if za.shape == zb.shape:
        panels[f"{names[0]} - {names[1]}"] = za - zb
    fig = grid_panels(panels, [f"{layer}" for layer in a.layers])
    note = "" if len(a.layers) == len(b.layers) else " (layers matched by relative depth)"
    fig.update_layout(title=f"{metric}: mean over tokens per head{note}")
    fig.layout.annotations[1].text = names[1] + (note and " (matched)")
    return fig


def strips(a: Trace, b: Trace, names: tuple[str, str], metric: str) -> go.Figure:
    """Token strips of ``metric`` (mean over layers and heads) of both runs and their
    difference over the tokens they share (same position and token)."""
    _check_metric(metric, a, b)
    va, vb = token_values(a, metric).numpy(), token_values(b, metric).numpy()
    n = min(len(va), len(vb))
    same = [i for i in range(n) if a.tokens[i] == b.tokens[i]]
    diff = np.full(n, np.nan)
    diff[same] = va[same] - vb[same]
    fig = make_subplots(
        rows=3, cols=1, vertical_spacing=0.12, subplot_titles=[*names, "difference"]
    )
    for row, (values, trace) in enumerate(((va, a), (vb, b), (diff, a)), start=1):
        text = quoted(trace.tokens)[: len(values)]
        fig.add_trace(
            go.Heatmap(
                z=[values],
                text=[text],
                colorscale="RdBu" if row == 3 else "Viridis",
                zmid=0 if row == 3 else None,
                hovertemplate=f"token %{{text}}: {metric} = %{{z:.4f}}<extra></extra>",
                colorbar=dict(len=0.28, y=1 - (row - 0.5) / 3, thickness=10),
            ),
            row=row,
            col=1,
        )
        fig.update_yaxes(showticklabels=False, row=row, col=1)
    fig.update_layout(
        title=f"{metric} per token (mean over layers and heads); difference where both runs "
        f"have the same token ({len(same)} of {n})",
        height=420,
        margin=MARGIN,
    )
    return fig


def heatmap_pair(wa: Tensor, wb: Tensor, names: tuple[str, str], title: str) -> go.Figure:
    """Two attention windows of the same shape side by side and their difference."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=[*names, "difference"])
    for col, (z, scale) in enumerate(((wa, "Viridis"), (wb, "Viridis"), (wa - wb, "RdBu")), 1):
        fig.add_trace(
            go.Heatmap(
                z=z.numpy(),
                colorscale=scale,
                zmid=0 if col == 3 else None,
                showscale=col == 3,
                hovertemplate="query %{y} -> key %{x}: %{z:.4f}<extra></extra>",
            ),
            row=1,
            col=col,
        )
        fig.update_yaxes(autorange="reversed", row=1, col=col)
    fig.update_layout(title=title, height=420, margin=MARGIN)
    return fig
