"""Plotly figures of a speech analysis: one token over the spectrogram, tokens x frames maps, the
alignment of each head, and the deletion curves."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from attnscope.report import PANEL_MARGIN, panel_height
from attnscope.speech.analysis import SpeechAnalysis
from attnscope.tokentext import labels as token_labels


def token_figure(analysis: SpeechAnalysis, token: int) -> go.Figure:
    """Spectrogram with word boundaries, each method's time-frequency saliency for ``token``, and
    its cross-attention next to the pooled saliency over encoder frames (each scaled to max 1)."""
    speech, cross = analysis.speech, analysis.cross
    if not -len(cross.tokens) <= token < len(cross.tokens):
        raise ValueError(f"token {token} outside the {len(cross.tokens)} output tokens")
    token %= len(cross.tokens)
    mel_seconds = speech.frame_seconds / speech.mel_per_frame
    mel_times = np.arange(speech.n_mel_audio) * mel_seconds
    frame_times = speech.frame_times()
    methods = list(analysis.saliency)
    name = token_labels(cross.tokens)[token]
    titles = [
        "log-mel spectrogram",
        *(f"|{m}| for {name}" for m in methods),
        "cross-attention vs saliency over encoder frames",
    ]
    fig = make_subplots(
        rows=len(titles), cols=1, shared_xaxes=True, vertical_spacing=0.05, subplot_titles=titles
    )
    spectrogram = speech.features[0, :, : speech.n_mel_audio].cpu().numpy()
    fig.add_trace(
        go.Heatmap(z=spectrogram, x=mel_times, colorscale="Viridis", showscale=False), 1, 1
    )
    for row, m in enumerate(methods, start=2):
        z = analysis.saliency[m].values[token].abs().numpy()
        fig.add_trace(go.Heatmap(z=z, x=mel_times, colorscale="Magma", showscale=False), row, 1)
    curves = {
        "attention (all heads)": cross.maps[:, :, token].mean((0, 1)),
        **{f"saliency {m}": p[token] for m, p in analysis.pooled.items()},
    }
    for label, values in curves.items():
        scaled = (values / values.max().clamp_min(1e-30)).numpy()
        fig.add_trace(go.Scatter(x=frame_times, y=scaled, name=label, mode="lines"), len(titles), 1)
    for w in analysis.words:
        fig.add_vline(x=w.start, line_dash="dot", line_color="white", row=1, col=1)
        fig.add_annotation(
            x=(w.start + w.end) / 2,
            y=0.98,
            yref="y domain",
            yanchor="top",
            text=w.word,
            showarrow=False,
            font=dict(color="white"),
            row=1,
            col=1,
        )
    fig.update_xaxes(title_text="seconds", row=len(titles), col=1)
    fig.update_layout(height=220 * len(titles), title=f"token {token}: {name}")
    return fig


def token_frame_maps(analysis: SpeechAnalysis) -> go.Figure:
    """Tokens x frames: cross-attention (mean over layers and heads) and each pooled saliency,
    each token's row scaled to max 1."""
    maps = {
        "cross-attention (mean)": analysis.cross.maps.mean((0, 1)),
        **{f"saliency {m}": p for m, p in analysis.pooled.items()},
    }
    fig = make_subplots(rows=1, cols=len(maps), subplot_titles=list(maps), shared_yaxes=True)
    labels = token_labels(analysis.tokens, indexed=True)
    for col, m in enumerate(maps.values(), start=1):
        z = (m / m.amax(-1, keepdim=True).clamp_min(1e-30)).numpy()
        heatmap = go.Heatmap(
            z=z,
            x=analysis.speech.frame_times(),
            y=labels,
            showscale=False,
            hovertemplate="%{y} at %{x:.2f} s: %{z:.3f} of the row's max<extra></extra>",
        )
        fig.add_trace(heatmap, 1, col)
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text="seconds")
    fig.update_layout(
        height=max(360, 160 + 18 * len(labels)), title="Output tokens x encoder frames"
    )
    return fig


def alignment_figure(analysis: SpeechAnalysis) -> go.Figure:
    """Layer x head Pearson rho between cross-attention and each saliency method."""
    rows = [r for r in analysis.alignment.to_pylist() if r["scope"] == "head"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    layers = analysis.cross.layers
    n_heads = analysis.cross.maps.shape[1]
    fig = make_subplots(rows=1, cols=max(1, len(methods)), subplot_titles=methods)
    for col, m in enumerate(methods, start=1):
        z = torch.full((len(layers), n_heads), float("nan"))
        for r in rows:
            if r["method"] == m:
                z[layers.index(r["layer"]), r["head"]] = r["pearson"]
        heatmap = go.Heatmap(
            z=z.numpy(),
            x=[f"h{h}" for h in range(n_heads)],
            y=[f"L{i}" for i in layers],
            zmin=-1,
            zmax=1,
            colorscale="RdBu",
            reversescale=True,
            hovertemplate="%{y} %{x}: rho %{z:.3f}<extra></extra>",
            showscale=col == 1,
        )
        fig.add_trace(heatmap, 1, col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        height=panel_height(len(layers)),
        margin=PANEL_MARGIN,
        title="Pearson rho, cross-attention vs saliency",
    )
    return fig


def deletion_figure(analysis: SpeechAnalysis) -> go.Figure:
    """Mean log-prob of the reference tokens as the most important frames are silenced."""
    fig = go.Figure()
    table = analysis.deletion.to_pylist()
    for name in dict.fromkeys(r["ranking"] for r in table):
        points = [r for r in table if r["ranking"] == name]
        fig.add_trace(
            go.Scatter(
                x=[r["fraction"] for r in points],
                y=[r["log_prob"] for r in points],
                name=f"{name} (AUC {points[0]['auc']:.2f})",
                mode="lines+markers",
            )
        )
    fig.update_layout(
        title="Deletion curves (lower = the ranking found the evidence sooner)",
        xaxis_title="fraction of audio frames silenced",
        yaxis_title="mean log-prob of the reference tokens",
    )
    return fig
