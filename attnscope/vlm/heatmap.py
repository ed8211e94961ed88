"""Where a token looks in the image: attention on the image tokens as patch-grid heatmaps, and
overlays on the image, scaled down to a bounded size (PNG through PIL, interactive through
plotly)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.colors
import plotly.graph_objects as go
import torch
from PIL import Image
from torch import Tensor

from attnscope.kernels.tiles import attention_tile
from attnscope.trace import Trace
from attnscope.vlm.images import OVERLAY_SIDE, data_uri, fit_size, resized
from attnscope.vlm.layout import ImageLayout, ImageSpan

COLORSCALE = "Viridis"


def image_attention(
    trace: Trace,
    positions: Sequence[int],
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> Tensor:
    """Attention of query rows ``positions`` on every image token (normalised over all keys the
    row sees), averaged over ``heads`` (default all). Needs the queries and keys kept by
    ``analyze_image``. ``[n_layers, n_positions, N]``, image tokens in layout order."""
    image = ImageLayout.of(trace).positions
    rows = torch.as_tensor(positions) % len(trace)
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    c0, c1 = int(image.min()), int(image.max()) + 1
    out = []
    for layer in layers if layers is not None else trace.layers:
        q, k, attention = trace.layer_qk(layer)
        per_head = [
            attention_tile(
                q,
                k,
                h,
                (r0, r1),
                (c0, c1),
                scale=attention["scale"],
                causal=attention["causal"],
                sliding_window=attention["sliding_window"],
                softcap=attention["softcap"],
            )
            for h in (heads if heads is not None else range(q.shape[0]))
        ]  # each [r, c]
        out.append(torch.stack(per_head).mean(0)[rows - r0][:, image - c0])
    return torch.stack(out)


def token_heatmaps(
    trace: Trace,
    position: int,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> list[Tensor]:
    """Attention of the token at ``position`` on each image, averaged over layers and heads, on the
    patch grid: one ``[rows, cols]`` tensor per image."""
    values = image_attention(trace, [position], layers, heads).mean(0)[0]  # [N]
    grids, taken = [], 0
    for span in ImageLayout.of(trace).images:
        grids.append(span.to_grid(values[taken : taken + len(span)]))
        taken += len(span)
    return grids


def _colormap(values: np.ndarray, colorscale: str) -> np.ndarray:
    """Values in [0, 1] ``[h, w]`` -> RGB uint8 ``[h, w, 3]`` through a plotly colour scale."""
    lut = plotly.colors.sample_colorscale(
        plotly.colors.get_colorscale(colorscale), np.linspace(0, 1, 256).tolist(), colortype="tuple"
    )
    lut = (np.asarray(lut) * 255).round().astype(np.uint8)  # [256, 3]
    return lut[(np.clip(values, 0, 1) * 255).round().astype(np.int64)]


def _normalised(grid: Tensor, vmax: float | None) -> np.ndarray:
    """``grid`` scaled from 0 to ``vmax`` (default: its own maximum) into [0, 1]."""
    g = grid.detach().float().cpu().numpy()
    top = float(g.max()) if vmax is None else vmax
    return np.clip(g / top, 0, 1) if top > 0 else np.zeros_like(g)


def overlay(
    image: Image.Image,
    grid: Tensor,
    span: ImageSpan,
    alpha: float = 0.6,
    colorscale: str = COLORSCALE,
    max_side: int = OVERLAY_SIDE,
    vmax: float | None = None,
) -> Image.Image:
    """The heatmap ``grid`` ``[rows, cols]`` (colours from 0 to ``vmax``, default the grid's
    maximum: pass one ``vmax`` to draw several tokens on one scale), bilinearly upsampled onto the
    region of the image that the model saw; the rest of the image (cropped away by the processor)
    is dimmed. Returns an RGB image of the original's aspect, at most ``max_side`` px per side
    (``image``: the original or a copy already scaled down to that bound)."""
    size = fit_size(span.size, max_side)
    sx, sy = size[0] / span.size[0], size[1] / span.size[1]
    left, top, right, bottom = (
        round(v * s) for v, s in zip(span.box, (sx, sy, sx, sy), strict=True)
    )
    region_size = (max(1, right - left), max(1, bottom - top))
    heat = Image.fromarray(_normalised(grid, vmax).astype(np.float32)).resize(
        region_size, Image.Resampling.BILINEAR
    )
    colored = Image.fromarray(_colormap(np.asarray(heat), colorscale))
    base = resized(image, size)
    out = Image.eval(base, lambda v: v // 2)  # dim what the model did not see
    region = base.crop((left, top, left + region_size[0], top + region_size[1]))
    out.paste(Image.blend(region, colored, alpha), (left, top))
    return out


def overlay_figure(
    image: Image.Image,
    grids: Tensor | Mapping[str, Tensor],
    span: ImageSpan,
    title: str = "",
    colorscale: str = COLORSCALE,
    max_side: int = OVERLAY_SIDE,
) -> go.Figure:
    """Interactive overlay: the image with the patch-grid heatmap on the region the model saw.

    ``grids``: one ``[rows, cols]`` grid, or several by label (e.g. one per token), shown one at a
    time through a slider over the same image, all on one colour scale (0 to the largest value of
    any grid). The image is embedded once, scaled to at most ``max_side`` px per side and
    compressed; the axes stay in pixels of the original image.
    """
    size = fit_size(span.size, max_side)
    px, py = span.size[0] / size[0], span.size[1] / size[1]  # original pixels per drawn pixel
    fig = go.Figure(
        go.Image(
            source=data_uri(resized(image, size)),
            x0=px / 2,
            dx=px,
            y0=py / 2,
            dy=py,
            hoverinfo="skip",
        )
    )
    labelled = {"": grids} if isinstance(grids, Tensor) else dict(grids)
    left, top, right, bottom = span.box
    dx, dy = (right - left) / span.cols, (bottom - top) / span.rows
    vmax = max(float(g.max()) for g in labelled.values())
    cells = [[f"patch ({r}, {c})" for c in range(span.cols)] for r in range(span.rows)]
    for i, (label, grid) in enumerate(labelled.items()):
        fig.add_trace(
            go.Heatmap(
                z=grid.detach().float().cpu().numpy(),
                x0=left + dx / 2,
                dx=dx,
                y0=top + dy / 2,
                dy=dy,
                text=cells,
                opacity=0.55,
                zsmooth="best",
                coloraxis="coloraxis",
                visible=i == 0,
                hovertemplate=f"{html.escape(label)}<br>%{{text}}: %{{z:.4f}}<extra></extra>",
            )
        )
    if len(labelled) > 1:
        steps = [
            dict(
                label=label,
                method="restyle",
                args=[{"visible": [True] + [j == i for j in range(len(labelled))]}],
            )
            for i, label in enumerate(labelled)
        ]
        fig.update_layout(
            sliders=[
                dict(steps=steps, currentvalue=dict(prefix=""), pad=dict(t=30), x=0.04, len=0.92)
            ]
        )
    fig.update_layout(
        title=title,
        coloraxis=dict(
            colorscale=colorscale, cmin=0, cmax=vmax, colorbar=dict(title="attention", len=0.8)
        ),
        margin=dict(l=10, r=10, t=50, b=10),
        height=max(420, min(720, round(560 * span.size[1] / span.size[0]) + 160)),
    )
    return fig
