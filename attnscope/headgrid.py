"""Layer x head grids coloured by a head score (``attnscope.headtable``): the one figure the
report, the explorer and notebooks draw, with each head's label in its hover."""

from __future__ import annotations

from collections import Counter
from html import escape
from pathlib import Path

import plotly.graph_objects as go
import pyarrow.parquet as pq
from torch import Tensor

from attnscope.errors import AttnscopeError
from attnscope.headtable import head_scores, label_heads, ordered_scores, score_title, table_scores
from attnscope.patterns import attention_kind
from attnscope.runfiles import HEADS_FILE
from attnscope.trace import Trace

# scores that are shares of attention (or of events): coloured on 0..1, so weak heads look weak
UNIT_SCORES = (
    "prev_token",
    "duplicate_token",
    "induction",
    "induction_random",
    "retrieval",
    "lookback",
    "sink",
)
MARGIN = dict(l=60, r=40, t=120, b=40)
CELL = 72  # px per head column while the grid fits MAX_WIDTH; wider grids take the page width
MIN_WIDTH, MAX_WIDTH = 700, 1100
VALUE_CELLS = 600  # grids of up to this many heads print each value in its cell


def trace_scores(trace: Trace, run_dir: str | Path | None = None) -> dict[str, Tensor]:
    """The head scores the views offer for ``trace``, ``[L, H]`` each, in ``SCORE_TITLES``
    order: ``head_scores`` (no span for cross-attention or signed distances, no receiver score
    where FAI is undefined: attention that is not causal), and the scores of the head table of
    ``run_dir`` (``attnscope heads --out``: random-token induction, retrieval), which win."""
    scores = head_scores(trace)
    kind = attention_kind(trace)
    if kind == "cross" or ("span" in scores and bool((scores["span"] < 0).any())):
        scores.pop("span", None)
    if kind != "causal":
        scores.pop("receiver", None)
    table = Path(run_dir) / HEADS_FILE if run_dir is not None else None
    if table is not None and table.is_file():
        scores.update(table_scores(pq.read_table(table), trace.layers, trace.n_heads))
    return ordered_scores(scores)


def score_grid(
    trace: Trace,
    shown: str | None = None,
    scores: dict[str, Tensor] | None = None,
    menu: bool = True,
) -> go.Figure:
    """Layer x head heatmap (layer 0 at the top) of the score ``shown`` (default: the first of
    ``scores``, which default to ``trace_scores(trace)``): values in the cells of grids up to
    ``VALUE_CELLS`` heads, label counts in the subtitle; hover: layer, head, value, label.
    ``menu``: every score is drawn and a dropdown picks the one shown; else only ``shown``."""
    scores = trace_scores(trace) if scores is None else ordered_scores(scores)
    if not scores:
        raise AttnscopeError(
            "the trace holds no metric that gives a head score (see Trace.heads): capture with "
            "metrics such as prev_token, induction, fai, sink_score or mean_distance"
        )
    shown = next(iter(scores)) if shown is None else shown
    if shown not in scores:
        raise AttnscopeError(f"no head score {shown!r} in this run; it has {list(scores)}")
    n_l, n_h = len(trace.layers), trace.n_heads
    labels = label_heads(scores, (n_l, n_h))  # (layer, head) order
    label_rows = [labels[li * n_h : (li + 1) * n_h] for li in range(n_l)]  # [L][H]
    names = list(scores) if menu else [shown]
    values = n_l * n_h <= VALUE_CELLS
    fig = go.Figure()
    for name in names:
        unit = name in UNIT_SCORES
        fig.add_trace(
            go.Heatmap(
                z=scores[name].numpy(),  # [L, H]
                x=[f"h{h}" for h in range(n_h)],
                y=[f"L{layer}" for layer in trace.layers],
                customdata=label_rows,
                texttemplate="%{z:.2f}" if values else None,
                textfont=dict(size=10),
                name=name,
                visible=name == shown,
                colorscale="Magma",
                zmin=0 if unit else None,
                zmax=1 if unit else None,
                hovertemplate=f"%{{y}} %{{x}}: {escape(score_title(name))} = %{{z:.3f}}"
                "<br>label: %{customdata}<extra></extra>",
                colorbar=dict(thickness=12),
            )
        )
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(tickangle=0)
    # 80 px: the colour bar; at least MIN_WIDTH: the title clears plotly's mode bar
    width = max(MIN_WIDTH, MARGIN["l"] + MARGIN["r"] + 80 + CELL * n_h)
    fig.update_layout(
        title=dict(
            text=_title(shown),
            subtitle=dict(text=_label_counts(labels)),
            y=1,
            yref="container",
            yanchor="top",
            pad=dict(t=12),
        ),
        height=max(300, MARGIN["t"] + MARGIN["b"] + 24 * n_l),
        width=width if width <= MAX_WIDTH else None,
        margin=MARGIN,
    )
    if menu:
        buttons = [
            dict(
                label=score_title(name),
                method="update",
                args=[{"visible": [n == name for n in names]}, {"title.text": _title(name)}],
            )
            for name in names
        ]
        fig.update_layout(
            updatemenus=[
                dict(
                    buttons=buttons,
                    active=names.index(shown),
                    x=0,
                    xanchor="left",
                    y=1,
                    yanchor="bottom",
                    pad=dict(b=8),
                    showactive=True,
                )
            ]
        )
    return fig


def _label_counts(labels: list[str]) -> str:
    counts = Counter("none" if label == "-" else label for label in labels)
    return "labels: " + ", ".join(f"{label} {n}" for label, n in sorted(counts.items()))


def _title(name: str) -> str:
    return f"Heads coloured by {escape(score_title(name))}"
