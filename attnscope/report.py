"""Static ``report.html`` of a Trace: token strips, layer x head maps, heads coloured by any head
score, sink heads and, when the run kept queries and keys, attention patterns (plotly)."""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go
import torch
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from attnscope import metrics
from attnscope.atomic import write_file_atomically
from attnscope.headgrid import score_grid, trace_scores
from attnscope.kernels.table import CAUSAL_ONLY
from attnscope.patterns import attend_to, attention_heatmap, attention_kind, token_axis
from attnscope.tokentext import labels as token_labels
from attnscope.trace import Trace

STRIP_METRICS = ("waad", "fai", "entropy")
PLOTLY_FILE = "plotly.min.js"  # what plotly's include_plotlyjs="directory" loads
PANEL_MIN = 240  # px of plot area of a layer x head panel, whatever the number of layers
PANEL_ROW = 24  # px per layer beyond that
PANEL_MARGIN = dict(l=60, r=40, t=110, b=60)
DISTANCE = {  # what the distance metrics measure, per attention kind
    "causal": "look-back distance t - s",
    "bidirectional": "distance |t - s| (both directions)",
}


def strip_metrics(trace: Trace, names: tuple[str, ...] = STRIP_METRICS) -> tuple[str, ...]:
    """The metrics of ``names`` the trace holds and its attention defines (causal-only metrics
    such as FAI are left out for bidirectional and cross-attention)."""
    causal = attention_kind(trace) == "causal"
    return tuple(
        n
        for n in names
        if (n in trace.rows or n in trace.cols) and (causal or n not in CAUSAL_ONLY)
    )


def token_strip(trace: Trace, names: tuple[str, ...] = STRIP_METRICS) -> go.Figure:
    """One row per metric over the tokens, averaged over layers and heads (NaN-aware); the
    token axis and every hover show the token text."""
    names = strip_metrics(trace, names)
    kind = attention_kind(trace)
    titles = [
        f"{n} (mean over layers and heads"
        + (f"; {DISTANCE[kind]}" if n in ("waad", "mean_distance") and kind in DISTANCE else "")
        + ")"
        for n in names
    ]
    fig = make_subplots(
        rows=len(names), cols=1, shared_xaxes=True, vertical_spacing=0.08, subplot_titles=titles
    )
    shown = token_labels(trace.tokens, indexed=True)
    for row, name in enumerate(names, start=1):
        values = {**trace.rows, **trace.cols}[name]
        mean = torch.nanmean(values.flatten(0, 1), dim=0)  # [T]
        finite = mean[1:][~mean[1:].isnan()]  # the first token (often a sink) would set the scale
        scale = (
            dict(zmin=float(finite.min()), zmax=float(torch.quantile(finite, 0.98)))
            if finite.numel()
            else {}
        )
        fig.add_trace(
            go.Heatmap(
                z=[mean.numpy()],
                x=list(range(len(mean))),
                **scale,
                text=[shown],
                colorscale="Viridis",
                hovertemplate="%{text}<br>" + name + " = %{z:.4f}<extra></extra>",
                colorbar=dict(
                    len=0.8 / len(names),
                    y=1 - (row - 0.5) / len(names),
                    title=name,
                    thickness=12,
                    nticks=4,
                ),
            ),
            row=row,
            col=1,
        )
        fig.update_yaxes(showticklabels=False, row=row, col=1)
    for start, label in _span_marks(trace):
        fig.add_vline(x=start - 0.5, line_dash="dot", line_color="white", annotation_text=label)
    bottom = f"xaxis{len(names)}" if len(names) > 1 else "xaxis"
    token_axis(fig, token_labels(trace.tokens), bottom)
    fig.update_layout(
        height=160 + 150 * len(names),
        margin=dict(l=20, r=20, t=60, b=120),
        title="Token strip",
    )
    return fig


def head_maps(trace: Trace) -> go.Figure:
    """Layer x head heatmaps: head span, mean entropy, first-token sink score (those the trace
    holds; no head span for cross-attention, whose keys are not tokens)."""
    kind = attention_kind(trace)
    panels, tags = {}, {}
    if "mean_distance" in trace.rows and kind in DISTANCE:
        span = trace.head_span()
        if bool((span < 0).any()):  # an encoder run written when distances were signed
            panels["head span (signed t - s; not ranked local / global)"] = span
        else:
            panels[f"head span (mean {DISTANCE[kind]})"] = span
            tags.update(metrics.head_groups(span))
    if "entropy" in trace.rows:
        panels["mean entropy"] = torch.nanmean(trace.rows["entropy"], -1)
    if "sink_score" in trace.cols:
        panels["sink score of token 0"] = trace.cols["sink_score"][..., 0]
        tags["sink"] = trace.sink_heads()
    labels = [
        [head_label(tags, li, h) for h in range(trace.n_heads)] for li in range(len(trace.layers))
    ]
    return layer_head_panels(panels, trace.layers, labels, "Heads")


def panel_height(n_layers: int) -> int:
    """Figure height (px) that gives a layer x head panel at least ``PANEL_MIN`` px of plot area."""
    return max(PANEL_MIN, PANEL_ROW * n_layers) + PANEL_MARGIN["t"] + PANEL_MARGIN["b"]


def layer_head_panels(
    panels: dict[str, torch.Tensor], layers: list[int], labels: list[list[str]], title: str
) -> go.Figure:
    """One layer x head heatmap per panel (values ``[L, H]``) side by side, each with its colour
    bar just right of it and at least ``PANEL_MIN`` px high; hover text from ``labels``."""
    n = max(1, len(panels))
    fig = make_subplots(rows=1, cols=n, subplot_titles=list(panels), horizontal_spacing=0.12)
    for col, z in enumerate(panels.values(), start=1):
        fig.add_trace(
            go.Heatmap(
                z=z.numpy(),
                x=[f"h{h}" for h in range(z.shape[1])],
                y=[f"L{i}" for i in layers],
                text=labels,
                colorscale="Magma",
                hovertemplate="%{y} %{x}: %{z:.3f}<br>%{text}<extra></extra>",
                colorbar=dict(
                    x=fig.layout[f"xaxis{col}"].domain[1] + 0.005,
                    xanchor="left",
                    len=1.0,
                    thickness=10,
                ),
            ),
            row=1,
            col=col,
        )
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(tickangle=0)
    fig.update_layout(height=panel_height(len(layers)), title=title, margin=PANEL_MARGIN)
    return fig


def head_label(tags: dict[str, torch.Tensor], layer: int, head: int) -> str:
    """The tags (bool ``[L, H]`` masks, e.g. ``Trace.head_tags``) of the head at layer index
    ``layer``, such as ``local, sink``, or ``-``."""
    return ", ".join(t for t, m in tags.items() if bool(m[layer, head])) or "-"


def _span_marks(trace: Trace) -> list[tuple[int, str]]:
    return [(s, name) for name, (s, _) in trace.spans.items() if s > 0]


def pattern_figures(trace: Trace) -> list[go.Figure]:
    """When the run kept queries and keys: where the last token attends in every head of the
    last kept layer, and the pattern of that layer's widest-reaching head (log scale)."""
    if not trace.qk:
        return []
    layer = max(trace.qk)
    li = trace.layers.index(layer)
    head = int(trace.head_span()[li].argmax()) if "mean_distance" in trace.rows else 0
    return [attend_to(trace, len(trace) - 1, layer), attention_heatmap(trace, layer, head)]


def _kind_note(trace: Trace) -> str:
    kind = attention_kind(trace)
    if kind == "causal":
        return "<p>Causal self-attention: distances are look-back distances t - s.</p>"
    hidden = ", ".join(n.upper() for n in CAUSAL_ONLY if n in trace.rows or n in trace.cols)
    return (
        f"<p><b>{html.escape(kind.capitalize())} attention</b>: distances are |t - s|; causal-only "
        f"metrics ({hidden or ', '.join(CAUSAL_ONLY)}) are undefined here and not shown.</p>"
    )


def write_report(trace: Trace, run_dir: Path) -> Path:
    """Write ``report.html`` next to the run's data and return its path; the head scores include
    those of a head table already in ``run_dir`` (``headgrid.trace_scores``)."""
    sink = trace.sink_heads()
    patterns = pattern_figures(trace)
    scores = trace_scores(trace, run_dir)
    summary = (
        f"<h1>attnscope run: {html.escape(str(trace.meta.get('model', '?')))}</h1>"
        f"<p>{len(trace)} tokens, {len(trace.layers)} layers x {trace.n_heads} heads; "
        f"{html.escape(attention_kind(trace))} attention; "
        f"backend {html.escape(str(trace.meta.get('backend')))}; "
        f"sink heads (alpha_0 &gt; {metrics.SINK_EPS}): {int(sink.sum())} of {sink.numel()}.</p>"
        + _kind_note(trace)
        + f"<h3>Prompt</h3><pre style='white-space:pre-wrap'>"
        f"{html.escape(str(trace.meta.get('text', '')))}</pre>"
        + (
            f"<h3>Generated</h3><pre style='white-space:pre-wrap'>"
            f"{html.escape(trace.meta['generated_text'])}</pre>"
            if trace.meta.get("generated_text")
            else ""
        )
        + "<p>The token strip's colour scales leave out the first token, often an attention sink "
        "that would dwarf the rest (hover shows every value). The menu above the head-score grid "
        "picks the score that colours the heads; hover names each head's label. How to read "
        "each panel: docs/READING.md.</p>"
        + (
            ""
            if patterns
            else "<p>No attention patterns: the run kept no queries/keys (analyse with "
            "<code>--keep-qk all</code> or <code>keep_qk=True</code>).</p>"
        )
    )
    path = Path(run_dir) / "report.html"
    grids = [score_grid(trace, scores=scores)] if scores else []
    figures = [token_strip(trace), head_maps(trace), *grids, *patterns]
    write_file_atomically(path, html_page(summary, figures))
    return path


def html_page(
    summary_html: str,
    figures: list[go.Figure],
    title: str = "attnscope report",
    plotlyjs_beside: bool = False,
) -> str:
    """A page of ``summary_html`` then the figures, plotly.js inlined once (self-contained), or
    with ``plotlyjs_beside`` loaded from ``PLOTLY_FILE`` next to the page (``write_plotlyjs``)."""
    first = "directory" if plotlyjs_beside else "inline"
    body = "".join(
        f.to_html(full_html=False, include_plotlyjs=first if i == 0 else False)
        for i, f in enumerate(figures)
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"</head><body style='font-family:sans-serif'>{summary_html}{body}</body></html>"
    )


def write_plotlyjs(folder: Path) -> Path:
    """Write plotly.js (about 4.8 MB) into ``folder`` as ``PLOTLY_FILE``, for pages that load it
    from beside them."""
    path = Path(folder) / PLOTLY_FILE
    if not path.is_file():
        write_file_atomically(path, get_plotlyjs().encode())
    return path
