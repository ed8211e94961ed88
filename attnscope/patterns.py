"""Attention patterns rebuilt exactly from a trace's kept queries and keys, as figures: one head's
heatmap over a window of tokens, and where one token attends (one head, or every head of a layer).

Rows cost O(T) each (``kernels.tiles.row_probabilities``); nothing builds more than the rows shown.
Cells a query cannot see (later keys of causal attention, keys beyond a sliding window) are drawn
as masked, not as zero attention; a window states the attention mass that falls outside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from torch import Tensor

from attnscope.errors import AttnscopeError
from attnscope.kernels.request import build_request
from attnscope.kernels.tiles import row_probabilities
from attnscope.tokentext import labels, tick_positions
from attnscope.trace import Trace

MAX_WINDOW = 160  # tokens per side of a default heatmap window
LOG_FLOOR = 1e-4  # log-scale heatmaps draw smaller probabilities (and zeros) at this value
MASKED_COLOR = "rgb(205, 205, 205)"  # the background masked cells show through
TOP_KEYS = 8  # keys named in the title of an attend-to figure


def attention_kind(trace: Trace) -> str:
    """``causal``, ``bidirectional`` or ``cross``: the kind of the trace's attention stack."""
    kind = trace.meta.get("attention")
    if kind is None:  # traces written before capture recorded it
        kind = "bidirectional" if trace.meta.get("kind") == "encoder" else "causal"
    return str(kind)


def attention_rows(
    trace: Trace, layer: int, positions: Sequence[int] | Tensor, heads: Sequence[int] | None = None
) -> tuple[Tensor, Tensor]:
    """Exact attention of the query rows ``positions`` over every key, per head (default all),
    from the layer's kept queries and keys: probabilities ``[n_heads, r, Tk]`` (normalised over
    every key the row sees, and the learned sink if any) and which keys each row may see, bool
    ``[r, Tk]``."""
    q, k, how = trace.layer_qk(layer)
    positions = torch.as_tensor(positions, dtype=torch.long)
    if positions.numel() and not (int(positions.min()) >= 0 and int(positions.max()) < q.shape[1]):
        raise AttnscopeError(f"token positions must be in 0..{q.shape[1] - 1}")
    heads = list(range(q.shape[0])) if heads is None else list(heads)
    kwargs = dict(
        scale=how["scale"],
        causal=how["causal"],
        sliding_window=how.get("sliding_window"),
        softcap=how.get("softcap"),
    )
    probs = torch.stack(
        [
            row_probabilities(q.float(), k.float(), h, positions, sinks=how.get("sinks"), **kwargs)
            for h in heads
        ]
    )  # [n_heads, r, Tk]
    visible = build_request(
        q[:1, positions][None].float(),  # [1, 1, r, D]
        k[:1][None].float(),  # [1, 1, Tk, D]
        q_pos=positions,
        k_pos=torch.arange(k.shape[1]),
        metrics=[],
        **kwargs,
    ).allowed(slice(None))[0, 0]  # [r, Tk]
    return probs, visible


def _key_labels(trace: Trace, n_keys: int) -> list[str]:
    """Labels of the keys: the tokens, or encoder positions for cross-attention."""
    if attention_kind(trace) == "cross":
        return [f"frame {i}" for i in range(n_keys)]
    return labels(trace.tokens, indexed=True)


def token_axis(
    fig: go.Figure, names: list[str], axis: str = "xaxis", positions: Sequence[int] | None = None
) -> None:
    """Label a numeric token axis with token text: every token up to 64, else an even sample
    (``tokentext.tick_positions``); rotated when more than a few are shown."""
    positions = list(range(len(names))) if positions is None else list(positions)
    picked = tick_positions(len(positions))
    fig.update_layout(
        {
            axis: dict(
                tickmode="array",
                tickvals=[positions[i] for i in picked],
                ticktext=[names[i] for i in picked],
                tickangle=-60 if len(picked) > 12 and axis.startswith("x") else 0,
                tickfont=dict(size=10),
            )
        }
    )


def attention_heatmap(
    trace: Trace,
    layer: int,
    head: int,
    rows: tuple[int, int] | None = None,
    keys: tuple[int, int] | None = None,
    log: bool = True,
) -> go.Figure:
    """One head's attention over query rows ``[r0, r1)`` and keys ``[c0, c1)`` (default: the
    last ``MAX_WINDOW`` tokens, keys the same window). ``log``: a log10 colour scale (floor
    ``LOG_FLOOR``), so that the first-token sink does not swamp the rest. Masked cells show the
    grey background; hover and title give the mass outside the window."""
    n = len(trace)
    r0, r1 = rows if rows is not None else (max(0, n - MAX_WINDOW), n)
    probs, visible = attention_rows(trace, layer, range(r0, r1), [head])
    probs = probs[0]  # [r, Tk]
    c0, c1 = (
        keys if keys is not None else ((r0, r1) if probs.shape[1] == n else (0, probs.shape[1]))
    )
    if not (0 <= r0 < r1 <= n and 0 <= c0 < c1 <= probs.shape[1]):
        raise AttnscopeError(
            f"window rows [{r0}, {r1}) keys [{c0}, {c1}) outside the run's {n} queries and "
            f"{probs.shape[1]} keys"
        )
    inside = probs[:, c0:c1]
    outside = (probs.sum(-1) - inside.sum(-1)).clamp_min(0)  # [r]
    shown = torch.where(visible[:, c0:c1], inside, torch.nan).numpy()
    z = np.log10(np.maximum(shown, LOG_FLOOR)) if log else shown
    z = np.where(np.isnan(shown), np.nan, z)
    query_names = labels(trace.tokens, indexed=True)[r0:r1]
    key_names = _key_labels(trace, probs.shape[1])[c0:c1]
    hover = [[f"{query_names[i]} → {key_names[j]}" for j in range(c1 - c0)] for i in range(r1 - r0)]
    custom = np.dstack([shown, np.broadcast_to(outside.numpy()[:, None], shown.shape)])
    colorbar = dict(title="attention")
    if log:
        ticks = np.arange(int(np.log10(LOG_FLOOR)), 1)
        colorbar.update(tickvals=ticks.tolist(), ticktext=[f"1e{t}" for t in ticks])
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(c0, c1)),
            y=list(range(r0, r1)),
            text=hover,
            customdata=custom,
            zmin=np.log10(LOG_FLOOR) if log else 0,
            zmax=0 if log else None,
            colorscale="Viridis",
            colorbar=colorbar,
            hovertemplate="%{text}<br>attention %{customdata[0]:.4f}"
            "<br>row's mass outside the window %{customdata[1]:.3f}<extra></extra>",
        )
    )
    token_axis(fig, key_names, "xaxis", range(c0, c1))
    token_axis(fig, query_names, "yaxis", range(r0, r1))
    side = int(min(900, max(480, 14 * (r1 - r0) + 200)))
    fig.update_layout(
        title=f"layer {layer} head {head}: rows {r0}..{r1 - 1}, keys {c0}..{c1 - 1}"
        f"{' (log scale)' if log else ''}<br><sup>"
        + ("grey: masked (the query cannot see the key); " if np.isnan(shown).any() else "")
        + f"mass outside the window per row: mean {float(outside.mean()):.3f}, "
        f"max {float(outside.max()):.3f}</sup>",
        height=side,
        width=side + 200,
        plot_bgcolor=MASKED_COLOR,
        yaxis=dict(autorange="reversed", title="query"),
        xaxis=dict(title="key", showgrid=False),
        margin=dict(l=120, r=20, t=90, b=120),
    )
    return fig


def attend_to(
    trace: Trace, token: int, layer: int | None = None, head: int | None = None
) -> go.Figure:
    """Where the token at position ``token`` attends in ``layer`` (default: the last kept layer):
    its attention row over the keys for one ``head`` (bars), or for every head of the layer
    (heads x keys, log colour scale) when ``head`` is None."""
    if not trace.qk:
        raise AttnscopeError(
            "the trace keeps no queries/keys: analyse with keep_qk=True (CLI: --keep-qk all)"
        )
    layer = max(trace.qk) if layer is None else layer
    if not -len(trace) <= token < len(trace):
        raise AttnscopeError(f"token {token} outside the run's {len(trace)} tokens")
    token %= len(trace)
    probs, visible = attention_rows(trace, layer, [token], None if head is None else [head])
    row = probs[:, 0]  # [n_heads, Tk]
    seen = visible[0].nonzero()[:, 0]
    last = int(seen.max()) + 1 if seen.numel() else 1  # keys after it are masked for every head
    row, keys = row[:, :last], _key_labels(trace, probs.shape[2])[:last]
    name = labels(trace.tokens)[token]
    mean = row.mean(0)
    top = mean.argsort(descending=True)[:TOP_KEYS].tolist()
    title = (
        f"where token {token} {name!r} attends, layer {layer}"
        f"{f' head {head}' if head is not None else ' (every head)'}<br><sup>top keys: "
        + ", ".join(f"{keys[i]} {float(mean[i]):.2f}" for i in top)
        + "</sup>"
    )
    if head is not None:
        fig = go.Figure(
            go.Bar(
                x=list(range(last)),
                y=row[0].numpy(),
                text=keys,
                hovertemplate="%{text}: %{y:.4f}<extra></extra>",
                marker_color="#440154",
            )
        )
        fig.update_layout(yaxis_title="attention", height=420)
    else:
        z = np.log10(np.maximum(row.numpy(), LOG_FLOOR))
        ticks = np.arange(int(np.log10(LOG_FLOOR)), 1)
        fig = go.Figure(
            go.Heatmap(
                z=z,
                x=list(range(last)),
                y=list(range(row.shape[0])),
                text=[keys] * row.shape[0],
                customdata=row.numpy(),
                zmin=float(np.log10(LOG_FLOOR)),
                zmax=0,
                colorscale="Viridis",
                colorbar=dict(
                    title="attention",
                    tickvals=ticks.tolist(),
                    ticktext=[f"1e{t}" for t in ticks],
                ),
                hovertemplate="head %{y} → %{text}: %{customdata:.4f}<extra></extra>",
            )
        )
        fig.update_layout(
            yaxis=dict(title="head", autorange="reversed", dtick=1),
            height=max(380, 160 + 24 * row.shape[0]),
        )
    token_axis(fig, keys, "xaxis")
    fig.update_layout(title=title, margin=dict(t=80, b=120))
    return fig
