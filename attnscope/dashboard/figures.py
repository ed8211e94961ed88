"""Plotly figures of the explorer: strips, layer x head grids, heatmaps, attend-to views.

Token text comes from ``attnscope.tokentext`` (axes sampled and rotated by
``patterns.token_axis``); plotly reads labels as HTML-like markup, so they are escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from itertools import pairwise

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from attnscope import metrics
from attnscope.dashboard.attend import Destinations
from attnscope.dashboard.data import (
    ALL_LAYERS,
    Window,
    check_position,
    head_tags,
    layer_index,
    metric_values,
    token_values,
)
from attnscope.headgrid import score_grid
from attnscope.patterns import LOG_FLOOR, MASKED_COLOR, attention_kind, token_axis
from attnscope.tokentext import labels
from attnscope.trace import Trace

GROUP_MARKS = {"local": "l", "global": "g", "sink": "s"}  # one letter: 12+ heads stay readable
MARGIN = dict(l=60, r=20, t=60, b=40)
HOVER_CELLS = 128 * 128  # heatmaps up to this many cells name both tokens in every hover
LINE_VIEW_TOKENS = 100  # the head view draws lines for windows up to this many tokens
THUMB = 24  # cells per side of a head-overview thumbnail
THUMB_FLOOR = 1e-3  # thumbnails: log10 of the share of the tile's maximum, floored here


def empty_figure() -> go.Figure:
    """A blank placeholder (its graph is hidden; the message goes in the text next to it)."""
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


def names(tokens: list[str]) -> list[str]:
    """Readable, escaped token text for axes and hovers."""
    return [escape(t) for t in labels(tokens)]


def quoted(tokens: list[str]) -> list[str]:
    """``7 '␣cat'`` for every token: position and readable text, for hovers."""
    return [f"{i} '{t}'" for i, t in enumerate(names(tokens))]


def token_strip(trace: Trace, metric: str, layer: int | str = ALL_LAYERS) -> go.Figure:
    """One cell per token coloured by ``metric`` averaged over heads (and layers); clickable."""
    values = token_values(trace, metric, layer).numpy()
    where = "all layers" if layer == ALL_LAYERS else f"layer {layer}"
    fig = go.Figure(
        go.Heatmap(
            z=[values],
            x=np.arange(len(values)),
            text=[quoted(trace.tokens)],
            colorscale="Viridis",
            hovertemplate=f"token %{{text}}<br>{metric} = %{{z:.4f}}<extra></extra>",
            colorbar=dict(title=dict(text=metric), thickness=12),
        )
    )
    _mark_spans(fig, trace)
    token_axis(fig, names(trace.tokens))
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(
        title=f"{metric}: mean over heads, {where} (click a token)", height=260, margin=MARGIN
    )
    fig.update_layout(margin=dict(b=90))
    return fig


def grid_panels(
    panels: dict[str, Tensor],
    layers: Sequence[int | str],
    hover: dict[str, list[list[str]]] | None = None,
    cell_text: dict[str, list[list[str]]] | None = None,
    shares: bool = False,
) -> go.Figure:
    """One layer x head heatmap per panel (values ``[L, H]``, NaN: no value), colour bars beside
    each; ``hover``/``cell_text``: per panel, ``[L][H]`` strings; ``shares``: values are
    attention shares, coloured on 0..1."""
    fig = make_subplots(
        rows=1, cols=len(panels), subplot_titles=list(panels), horizontal_spacing=0.09
    )
    for col, (title, z) in enumerate(panels.items(), start=1):
        extra = (hover or {}).get(title)
        cells = (cell_text or {}).get(title)
        fig.add_trace(
            go.Heatmap(
                z=z.numpy(),
                x=[f"h{h}" for h in range(z.shape[1])],
                y=[f"L{layer}" for layer in layers],
                name=title,
                text=cells,
                texttemplate="%{text}" if cells else None,
                customdata=extra,
                textfont=dict(size=9),
                colorscale="Magma",
                zmin=0 if shares else None,
                zmax=1 if shares else None,
                hovertemplate=f"%{{y}} %{{x}}: {escape(title)} = %{{z:.4f}}"
                + ("<br>%{customdata}" if extra else "")
                + "<extra></extra>",
            ),
            row=1,
            col=col,
        )
    _colorbars_beside(fig)
    fig.update_layout(height=grid_height(len(layers)), margin=MARGIN)
    return fig


def grid_height(n_layers: int) -> int:
    """Layer x head grids keep at least 300 px and 26 px a layer: labels never overprint."""
    return max(300, 120 + 26 * n_layers)


def token_heads(trace: Trace, position: int, shown: list[str]) -> go.Figure:
    """Layer x head maps of the metrics ``shown`` at one token."""
    check_position(trace, position)
    fig = grid_panels({m: metric_values(trace, m)[..., position] for m in shown}, trace.layers)
    fig.update_layout(
        title=f"token {quoted(trace.tokens)[position]}: statistics in every layer and head"
    )
    return fig


def head_panels(trace: Trace) -> dict[str, Tensor]:
    """The per-head numbers of the head grid that this run has, ``[L, H]`` each."""
    kind = attention_kind(trace)
    panels = {}
    if "mean_distance" in trace.rows:
        what = "mean look-back distance" if kind == "causal" else "mean |distance|"
        panels[f"head span ({what})"] = trace.head_span()
    if "entropy" in trace.rows:
        panels["mean entropy"] = torch.nanmean(trace.rows["entropy"], -1)
    if "sink_score" in trace.cols:
        panels["sink score of token 0"] = trace.cols["sink_score"][..., 0]
    for name, values in trace.rows.items():  # speech runs: max attention, audio mass
        if len(panels) < 3 and f"mean {name}" not in panels and name != "entropy":
            panels[f"mean {name}"] = torch.nanmean(values, -1)
    return panels


def head_grid(
    trace: Trace,
    selected: dict | None = None,
    score: str | None = None,
    scores: dict[str, Tensor] | None = None,
) -> go.Figure:
    """The head grid with the selected head outlined; clickable. Without ``score``: the panels
    of ``head_panels`` with each head's groups marked; with one: the heads coloured by that head
    score (``headgrid.score_grid`` over ``scores``, default the trace's), labels in the hover."""
    if score is not None:
        fig = score_grid(trace, score, scores, menu=False)
        fig.update_yaxes(autorange=True)  # layer 0 at the bottom, as in the explorer's grids
        fig.update_layout(
            title_subtitle_text=f"{fig.layout.title.subtitle.text}; click a head",
            height=grid_height(len(trace.layers)) + 20,  # + the subtitle's line
            margin=dict(MARGIN, t=80),
        )
        n_panels = 1
    else:
        panels = head_panels(trace)
        fig = grid_panels(panels, trace.layers)
        n_panels = len(panels)
        title = "Heads (click a head)"
        if "mean_distance" in trace.rows and "sink_score" in trace.cols:
            _mark_groups(fig, trace, n_panels)
            title = (
                f"Heads: l/g = local/global (bottom/top {metrics.HEAD_GROUP_FRACTION:.0%} by head "
                f"span), s = sink (alpha_0 > {metrics.SINK_EPS}); click a head"
            )
        fig.update_layout(title=title)
    if selected is not None and selected.get("layer") in trace.layers:
        for col in range(1, n_panels + 1):
            _outline_cell(fig, selected["head"], layer_index(trace, selected["layer"]), col)
    return fig


def _mark_groups(fig: go.Figure, trace: Trace, n_panels: int) -> None:
    x, y, text = [], [], []
    for li, layer_tags in enumerate(head_tags(trace)):
        for h, groups in enumerate(layer_tags):
            if groups:  # unmarked heads get no point: plotly mis-draws empty texts on update
                x.append(f"h{h}")
                y.append(f"L{trace.layers[li]}")
                text.append("".join(GROUP_MARKS[g] for g in groups))
    size = 10 if trace.n_heads <= 8 else 8
    for col in range(1, n_panels + 1):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                text=text,
                mode="text",
                textfont=dict(color="white", size=size, shadow="1px 1px 2px black"),
                hoverinfo="skip",
                showlegend=False,
            ),
            row=1,
            col=col,
        )


def _outline_cell(fig: go.Figure, x: int, y: int, col: int) -> None:
    """A box around cell (x, y) of the ``col``-th panel (categorical axes: index +- 0.5)."""
    suffix = "" if col == 1 else str(col)
    fig.add_shape(
        type="rect",
        x0=x - 0.5,
        x1=x + 0.5,
        y0=y - 0.5,
        y1=y + 0.5,
        xref=f"x{suffix}",
        yref=f"y{suffix}",
        line=dict(color="#00e5ff", width=3),
    )


def head_curve(trace: Trace, metric: str, layer: int, head: int) -> go.Figure:
    """``metric`` of one head over the tokens."""
    values = metric_values(trace, metric)[layer_index(trace, layer), head].numpy()
    fig = go.Figure(
        go.Scatter(
            x=np.arange(len(values)),
            y=values,
            customdata=quoted(trace.tokens),
            mode="lines+markers" if len(values) <= 200 else "lines",
            hovertemplate=f"token %{{customdata}}<br>{metric} = %{{y:.4f}}<extra></extra>",
        )
    )
    _mark_spans(fig, trace)
    token_axis(fig, names(trace.tokens))
    fig.update_layout(
        title=f"{metric} of layer {layer} head {head} per token",
        yaxis_title=metric,
        height=320,
        margin=dict(MARGIN, b=90),
    )
    return fig


# -- attention of one head ------------------------------------------------------------------
def attention_heatmap(
    window: Window,
    tokens: list[str],
    *,
    log: bool = False,
    hide_sink: bool = False,
    renormalise: bool = False,
    token: int | None = None,
) -> go.Figure:
    """The pooled attention of a window: queries down, keys across. ``log``: log10 colours
    (floor ``LOG_FLOOR``); ``hide_sink``: leave out the first key; ``renormalise``: each row's
    share of the attention that stays inside the window. Masked cells show the grey background;
    the title states the mass outside the window."""
    z = window.matrix.clone()  # [rows, cols]
    inside = window.inside_mass()  # [rows]
    heights = torch.tensor(
        [min(window.pool, window.end - s) for s in range(window.start, window.end, window.pool)]
    )
    outside = float(((1 - inside).clamp_min(0) * heights).sum() / heights.sum())
    if renormalise:
        z = z / inside[:, None]
    z[window.masked()] = float("nan")
    keys = window.start + window.pool * np.arange(z.shape[1])
    queries = window.start + window.pool * np.arange(z.shape[0])
    if hide_sink and window.start == 0:
        z, keys = z[:, 1:], keys[1:]
    shown = z.numpy()
    values = np.log10(np.maximum(shown, LOG_FLOOR)) if log else shown
    values = np.where(np.isnan(shown), np.nan, values)
    title = (
        f"layer {window.layer} head {window.head}: attention over tokens "
        f"{window.start}-{window.end - 1}"
    )
    if window.pool > 1:
        title += f", mean of {window.pool}x{window.pool} blocks"
    if not window.exact:
        title += f" (estimated from {window.sampled_rows} of {window.pool} evenly spaced query rows per block)"
    notes = [f"mass outside the window: {outside:.3f} of each row on average"]
    if log:
        notes.append("log scale")
    if renormalise:
        notes.append("rows renormalised to the window")
    if hide_sink and window.start == 0:
        notes.append(f"key{'s 0-' + str(window.pool - 1) if window.pool > 1 else ' 0'} hidden")
    notes.append("grey: masked (the query cannot see the key)")
    colorbar = _colorbar(log, title="share" if renormalise else "attention")
    heat = go.Heatmap(
        z=values,
        x=keys,
        y=queries,
        colorscale="Viridis",
        zmin=float(np.log10(LOG_FLOOR)) if log else 0,
        zmax=0 if log else None,
        colorbar=colorbar,
        hoverongaps=False,
    )
    if window.pool == 1 and values.size <= HOVER_CELLS:
        q, k = quoted(tokens), quoted(tokens)
        heat.update(
            text=[
                [f"query {q[i]} -> key {k[j]}: {_value(shown[a, b])}" for b, j in enumerate(keys)]
                for a, i in enumerate(queries)
            ],
            hovertemplate="%{text}<extra></extra>",
        )
    else:
        span = "" if window.pool == 1 else f" (+{window.pool - 1})"
        value = "%{customdata:.4f}" if log else "%{z:.4f}"  # log colours: the value aside
        heat.update(
            customdata=shown if log else None,
            hovertemplate=f"queries %{{y}}{span} -> keys %{{x}}{span}: {value}<extra></extra>",
        )
    fig = go.Figure(heat)
    if window.pool == 1:
        token_axis(fig, names(tokens)[window.start : window.end], "xaxis", keys)
        token_axis(fig, names(tokens)[window.start : window.end], "yaxis", queries)
    if token is not None and window.start <= token < window.end:
        row = window.start + (token - window.start) // window.pool * window.pool
        fig.add_hrect(y0=row - 0.5, y1=row + window.pool - 0.5, line=dict(color="#ff3d00"))
    fig.update_yaxes(autorange="reversed", title="query")
    fig.update_xaxes(title="key", showgrid=False)
    fig.update_layout(
        title=f"{title}<br><sup>{'; '.join(notes)}</sup>",
        height=680,
        margin=dict(l=90, r=20, t=80, b=90),
        plot_bgcolor=MASKED_COLOR,
    )
    return fig


def cross_heatmap(
    maps: Tensor,
    tokens: list[str],
    seconds: float,
    features: Tensor | None,
    layer: int,
    head: int,
    *,
    log: bool = False,
    token: int | None = None,
) -> go.Figure:
    """A speech run's cross-attention of one head, tokens x audio frames ``maps [T, F]``, under
    the spectrogram ``features [mel bins, mel frames]`` on the same time axis."""
    rows = 2 if features is not None else 1
    fig = make_subplots(
        rows=rows,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.35, 0.65][-rows:],
        vertical_spacing=0.04,
    )
    if features is not None:
        step = seconds * maps.shape[1] / features.shape[1]
        fig.add_trace(
            go.Heatmap(
                z=features.numpy(),
                x=step * np.arange(features.shape[1]),
                colorscale="Greys",
                showscale=False,
                hovertemplate="%{x:.2f} s, mel bin %{y}<extra></extra>",
                name="log-mel",
            ),
            row=1,
            col=1,
        )
    shown = maps.numpy()
    values = np.log10(np.maximum(shown, LOG_FLOOR)) if log else shown
    q = quoted(tokens)
    fig.add_trace(
        go.Heatmap(
            z=values,
            x=seconds * np.arange(maps.shape[1]),
            y=np.arange(maps.shape[0]),
            colorscale="Viridis",
            zmin=float(np.log10(LOG_FLOOR)) if log else 0,
            text=[
                [
                    f"token {q[t]} -> frame {f} ({f * seconds:.2f} s): {shown[t, f]:.4f}"
                    for f in range(maps.shape[1])
                ]
                for t in range(maps.shape[0])
            ],
            hovertemplate="%{text}<extra></extra>",
            colorbar=_colorbar(log, len=0.6, y=0.3),
            name="cross-attention",
        ),
        row=rows,
        col=1,
    )
    token_axis(fig, names(tokens), "yaxis" + ("2" if rows == 2 else ""))
    fig.update_yaxes(autorange="reversed", row=rows, col=1)
    if token is not None:
        fig.add_hrect(y0=token - 0.5, y1=token + 0.5, line=dict(color="#ff3d00"), row=rows, col=1)
    fig.update_xaxes(title="seconds", row=rows, col=1)
    fig.update_layout(
        title=f"layer {layer} head {head}: cross-attention of each output token over the audio "
        "frames (spectrogram above)",
        height=300 + 22 * len(tokens) + (160 if features is not None else 0),
        margin=dict(l=90, r=20, t=60, b=50),
    )
    return fig


# -- where one token attends -----------------------------------------------------------------
def attend_figure(
    rows: Tensor,
    visible: Tensor,
    tokens: list[str],
    position: int,
    layer: int,
    head: int,
    key_names: list[str] | None = None,
    log: bool = False,
) -> go.Figure:
    """Where the token at ``position`` attends in ``layer``: the chosen head's row (bars, top)
    and every head of the layer (heads x keys, below, the chosen head outlined).
    ``rows [H, Tk]``, ``visible [Tk]``; ``key_names``: labels of non-token keys (frames)."""
    n_heads, n_keys = rows.shape
    keys = key_names if key_names is not None else quoted(tokens)
    axis = key_names if key_names is not None else names(tokens)
    query = quoted(tokens)[position]
    shown = torch.where(visible[None], rows, torch.nan).numpy()
    text = [f"query {query} -> key {keys[j]}: {_value(shown[head, j])}" for j in range(n_keys)]
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        row_heights=[0.45, 0.55],
        subplot_titles=[f"head {head}", f"every head of layer {layer}"],
    )
    fig.add_trace(
        go.Bar(
            x=np.arange(n_keys),
            y=np.nan_to_num(shown[head]),
            text=text,
            textposition="none",
            hovertemplate="%{text}<extra></extra>",
            marker_color="#3b528b",
            name=f"head {head}",
        ),
        row=1,
        col=1,
    )
    values = np.log10(np.maximum(shown, LOG_FLOOR)) if log else shown
    colorbar = _colorbar(log, len=0.5, y=0.27)
    fig.add_trace(
        go.Heatmap(
            z=np.where(np.isnan(shown), np.nan, values),
            x=np.arange(n_keys),
            y=np.arange(n_heads),
            colorscale="Viridis",
            zmin=float(np.log10(LOG_FLOOR)) if log else 0,
            zmax=0 if log else None,
            hoverongaps=False,
            colorbar=colorbar,
            name=f"layer {layer}",
        ),
        row=2,
        col=1,
    )
    heads = fig.data[-1]
    if n_heads * n_keys <= HOVER_CELLS:  # every cell names both tokens
        heads.update(
            text=[
                [f"query {query} -> key {keys[j]}: {_value(shown[h, j])}" for j in range(n_keys)]
                for h in range(n_heads)
            ],
            hovertemplate="head %{y}: %{text}<extra></extra>",
        )
    else:  # long runs: positions in the hover, token text on the axis and in the bars
        heads.update(
            customdata=shown,
            hovertemplate="head %{y}: key %{x}: %{customdata:.4f}<extra></extra>",
        )
    fig.add_hrect(y0=head - 0.5, y1=head + 0.5, line=dict(color="#ff3d00", width=2), row=2, col=1)
    if key_names is None:
        for r in (1, 2):
            fig.add_vline(x=position, line_dash="dot", line_color="#ff3d00", row=r, col=1)
    fig.update_yaxes(title="attention", row=1, col=1)
    fig.update_yaxes(title="head", autorange="reversed", dtick=1, row=2, col=1)
    token_axis(fig, axis, "xaxis2")
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    top = np.argsort(-np.nan_to_num(shown[head]))[:5]
    fig.update_layout(
        title=f"where token {query} attends, layer {layer}<br><sup>head {head} top keys: "
        + ", ".join(f"{keys[j]} {shown[head, j]:.3f}" for j in top)
        + "</sup>",
        height=max(460, 330 + 16 * n_heads),
        margin=dict(l=60, r=20, t=90, b=100),
        plot_bgcolor=MASKED_COLOR,
        showlegend=False,
    )
    return fig


def destinations_figure(
    dest: Destinations, tokens: list[str], key_names: list[str] | None
) -> go.Figure:
    """Layer x head grid of where one token's attention goes: its top key's share (cells name
    the key when there is room) and its mass on each span; clickable."""
    keys = key_names if key_names is not None else quoted(tokens)
    short = [escape(t[:6]) for t in (key_names or labels(tokens))]
    n_l, n_h, _ = dest.top_keys.shape

    def top_list(li: int, h: int) -> str:
        pairs = [
            f"{keys[int(k)]} {float(m):.3f}"
            for k, m in zip(dest.top_keys[li, h], dest.top_mass[li, h], strict=True)
            if int(k) >= 0
        ]
        return "top keys: " + ", ".join(pairs) if pairs else "no kept queries/keys"

    hover = [[top_list(li, h) for h in range(n_h)] for li in range(n_l)]
    top_title = "share of the top key"
    panels = {
        top_title: dest.top_mass[..., 0],
        **{f"mass on {s}": m for s, m in dest.span_mass.items()},
    }
    cells = None
    if key_names is None and n_h * len(panels) <= 24:  # room to name the top key
        cells = {
            top_title: [
                [
                    short[int(dest.top_keys[li, h, 0])] if int(dest.top_keys[li, h, 0]) >= 0 else ""
                    for h in range(n_h)
                ]
                for li in range(n_l)
            ]
        }
    fig = grid_panels(panels, dest.layers, {p: hover for p in panels}, cells, shares=True)
    title = f"where token {quoted(tokens)[dest.position]} attends in every layer and head (click a head)"
    if dest.missing:
        title += f"<br><sup>empty rows: layers {dest.missing} kept no queries/keys</sup>"
    fig.update_layout(title=title, margin=dict(MARGIN, t=80))
    return fig


# -- every head at a glance -------------------------------------------------------------------
def head_overview(
    thumbs: dict[tuple[int, int], Tensor], layers: list[int], n_heads: int, selected: dict | None
) -> go.Figure:
    """Thumbnails of every head's pattern (model view), one tile per (layer, head) of ``layers``,
    each scaled to its own maximum, tiled into one heatmap; click a tile to enlarge it."""
    side = max(max(t.shape) for t in thumbs.values())
    cell = side + 1  # one blank row/column between tiles
    tiles = np.full((len(layers) * cell, n_heads * cell), np.nan)
    for (layer, head), t in thumbs.items():
        li = layers.index(layer)
        peak = float(t.nan_to_num().max()) or 1.0
        tile = np.log10(np.maximum((t / peak).numpy(), THUMB_FLOOR))  # NaN (masked) stays
        tiles[li * cell : li * cell + t.shape[0], head * cell : head * cell + t.shape[1]] = tile
    text = [
        [f"layer {layers[r // cell]} head {c // cell}" for c in range(tiles.shape[1])]
        for r in range(tiles.shape[0])
    ]
    fig = go.Figure(
        go.Heatmap(
            z=tiles,
            text=text,
            colorscale="Viridis",
            showscale=False,
            hoverongaps=False,
            hovertemplate="%{text} (click to enlarge)<extra></extra>",
        )
    )
    chosen = None if selected is None else (selected.get("layer"), selected.get("head"))
    if chosen in thumbs:
        li, h = layers.index(chosen[0]), chosen[1]
        rows, cols = thumbs[chosen].shape
        fig.add_shape(
            type="rect",
            x0=h * cell - 0.5,
            x1=h * cell + cols - 0.5,
            y0=li * cell - 0.5,
            y1=li * cell + rows - 0.5,
            line=dict(color="#ff3d00", width=3),
        )
    fig.update_xaxes(
        tickmode="array",
        tickvals=[h * cell + side / 2 for h in range(n_heads)],
        ticktext=[f"h{h}" for h in range(n_heads)],
        side="top",
        showgrid=False,
        zeroline=False,
        constrain="domain",
    )
    fig.update_yaxes(
        tickmode="array",
        tickvals=[li * cell + side / 2 for li in range(len(layers))],
        ticktext=[f"L{layer}" for layer in layers],
        autorange="reversed",
        showgrid=False,
        zeroline=False,
        scaleanchor="x",
        constrain="domain",
    )
    tile_px = max(36, min(90, 900 // n_heads, 1100 // len(layers)))
    fig.update_layout(
        title="Every head's pattern (click to enlarge)<br><sup>queries down, keys across; log "
        "colours, each tile scaled to its own maximum</sup>",
        height=120 + tile_px * len(layers),
        width=max(560, 120 + tile_px * n_heads),
        margin=dict(l=50, r=10, t=80, b=10),
        plot_bgcolor="white",
    )
    return fig


def head_lines(
    matrix: Tensor, start: int, tokens: list[str], layer: int, head: int, token: int | None
) -> go.Figure:
    """bertviz-style head view of a window of at most ``LINE_VIEW_TOKENS`` tokens: queries on
    the left, keys on the right, a line for each pair, as opaque as its attention weight (only
    the selected token's lines when it is in the window)."""
    n = matrix.shape[0]
    text = names(tokens)[start : start + n]
    rows = [token - start] if token is not None and start <= token < start + n else range(n)
    floor = 0.002 if len(rows) == 1 else 0.02
    fig = go.Figure()
    bins = np.array([0.0, 0.05, 0.15, 0.35, 0.6, 1.01])
    for lo, hi in pairwise(bins):
        xs: list[float | None] = []
        ys: list[float | None] = []
        for i in rows:
            for j in range(n):
                w = float(matrix[i, j])
                if w >= max(lo, floor) and w < hi:
                    xs += [0, 1, None]
                    ys += [-i, -j, None]
        if xs:
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    hoverinfo="skip",
                    showlegend=False,
                    line=dict(color=f"rgba(31, 90, 200, {0.15 + 0.85 * hi:.2f})", width=1 + 4 * lo),
                )
            )
    for side, x in (("query", 0), ("key", 1)):
        colors = [
            "#ff3d00" if len(rows) == 1 and i == rows[0] and side == "query" else "#222"
            for i in range(n)
        ]
        fig.add_trace(
            go.Scatter(
                x=[x] * n,
                y=[-i for i in range(n)],
                mode="text",
                text=text,
                textposition="middle left" if x == 0 else "middle right",
                textfont=dict(size=11, color=colors),
                showlegend=False,
                customdata=quoted(tokens)[start : start + n],
                hovertemplate=f"{side} %{{customdata}}<extra></extra>",
            )
        )
    fig.update_xaxes(visible=False, range=[-0.6, 1.6])
    fig.update_yaxes(visible=False, range=[-n + 0.3, 0.8])
    fig.update_layout(
        title=f"head view: layer {layer} head {head}, tokens {start}-{start + n - 1} "
        f"(line opacity = attention{'' if len(rows) == 1 else f'; weights >= {floor}'})",
        height=120 + 18 * n,
        width=520,
        margin=dict(l=10, r=10, t=60, b=10),
        plot_bgcolor="white",
    )
    return fig


def _colorbar(log: bool, title: str = "attention", **place: float) -> dict:
    """A colour bar; on a log10 scale its ticks read 1e-4 ... 1e0."""
    bar = dict(thickness=12, title=title, **place)
    if log:
        ticks = list(range(int(np.log10(LOG_FLOOR)), 1))
        bar.update(tickvals=ticks, ticktext=[f"1e{t}" for t in ticks])
    return bar


def _value(p: float) -> str:
    return "masked" if np.isnan(p) else f"{p:.4f}"


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
