"""Static ``report.html`` of a Trace: token strips, layer x head maps, sink heads (plotly)."""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from attnscope import metrics
from attnscope.atomic import write_file_atomically
from attnscope.trace import Trace

STRIP_METRICS = ("waad", "fai", "entropy")


def token_strip(trace: Trace, names: tuple[str, ...] = STRIP_METRICS) -> go.Figure:
    """One row per metric over the tokens, averaged over layers and heads (NaN-aware)."""
    names = tuple(n for n in names if n in trace.rows or n in trace.cols)
    fig = make_subplots(
        rows=len(names),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.04,
        subplot_titles=[f"{n} (mean over layers and heads)" for n in names],
    )
    labels = [f"{i}: {t}" for i, t in enumerate(trace.tokens)]
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
                text=[labels],
                colorscale="Viridis",
                hovertemplate="%{text}<br>" + name + " = %{z:.4f}<extra></extra>",
                colorbar=dict(len=1 / len(names), y=1 - (row - 0.5) / len(names), title=name),
            ),
            row=row,
            col=1,
        )
        fig.update_yaxes(showticklabels=False, row=row, col=1)
    for start, label in _span_marks(trace):
        fig.add_vline(x=start - 0.5, line_dash="dot", line_color="white", annotation_text=label)
    fig.update_layout(
        height=120 + 110 * len(names), margin=dict(l=20, r=20, t=60, b=20), title="Token strip"
    )
    return fig


def head_maps(trace: Trace) -> go.Figure:
    """Layer x head heatmaps: head span, mean entropy, first-token sink score."""
    tags = trace.head_tags()
    labels = [
        [head_label(tags, li, h) for h in range(trace.n_heads)] for li in range(len(trace.layers))
    ]
    panels = {
        "head span (mean look-back distance)": trace.head_span(),
        "mean entropy": torch.nanmean(trace.rows["entropy"], -1),
        "sink score of token 0": trace.cols["sink_score"][..., 0],
    }
    return layer_head_panels(panels, trace.layers, labels, "Heads")


def layer_head_panels(
    panels: dict[str, torch.Tensor], layers: list[int], labels: list[list[str]], title: str
) -> go.Figure:
    """One layer x head heatmap per panel (values ``[L, H]``), hover text from ``labels``."""
    fig = make_subplots(
        rows=1, cols=len(panels), subplot_titles=list(panels), horizontal_spacing=0.1
    )
    for col, z in enumerate(panels.values(), start=1):
        fig.add_trace(
            go.Heatmap(
                z=z.numpy(),
                x=[f"h{h}" for h in range(z.shape[1])],
                y=[f"L{i}" for i in layers],
                text=labels,
                colorscale="Magma",
                hovertemplate="%{y} %{x}: %{z:.3f}<br>%{text}<extra></extra>",
                colorbar=dict(x=fig.layout[f"xaxis{col}"].domain[1] + 0.005, len=0.9, thickness=12),
            ),
            row=1,
            col=col,
        )
    fig.update_layout(height=80 + 22 * len(layers), title=title)
    return fig


def head_label(tags: dict[str, torch.Tensor], layer: int, head: int) -> str:
    """The tags (bool ``[L, H]`` masks, e.g. ``Trace.head_tags``) of the head at layer index
    ``layer``, such as ``local, sink``, or ``-``."""
    return ", ".join(t for t, m in tags.items() if bool(m[layer, head])) or "-"


def _span_marks(trace: Trace) -> list[tuple[int, str]]:
    return [(s, name) for name, (s, _) in trace.spans.items() if s > 0]


def write_report(trace: Trace, run_dir: Path) -> Path:
    """Write ``report.html`` next to the run's data and return its path."""
    sink = trace.sink_heads()
    summary = (
        f"<h1>attnscope run: {html.escape(str(trace.meta.get('model', '?')))}</h1>"
        f"<p>{len(trace)} tokens, {len(trace.layers)} layers x {trace.n_heads} heads; "
        f"backend {html.escape(str(trace.meta.get('backend')))}; "
        f"sink heads (alpha_0 &gt; {metrics.SINK_EPS}): {int(sink.sum())} of {sink.numel()}.</p>"
        f"<h3>Prompt</h3><pre style='white-space:pre-wrap'>"
        f"{html.escape(str(trace.meta.get('text', '')))}</pre>"
        + (
            f"<h3>Generated</h3><pre style='white-space:pre-wrap'>"
            f"{html.escape(trace.meta['generated_text'])}</pre>"
            if trace.meta.get("generated_text")
            else ""
        )
        + "<p>The token strip's colour scales leave out the first token, often an attention sink "
        "that would dwarf the rest (hover shows every value).</p>"
    )
    path = Path(run_dir) / "report.html"
    write_file_atomically(path, html_page(summary, [token_strip(trace), head_maps(trace)]))
    return path


def html_page(summary_html: str, figures: list[go.Figure], title: str = "attnscope report") -> str:
    """A self-contained page (plotly.js inlined once): ``summary_html`` then the figures."""
    body = "".join(
        f.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False)
        for i, f in enumerate(figures)
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"</head><body style='font-family:sans-serif'>{summary_html}{body}</body></html>"
    )
