"""Files of a VLM run: heatmap overlays per token (PNG) and ``overlays.html`` (plotly), of bounded
size whatever the size of the images."""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
import torch
from PIL import Image

from attnscope.atomic import write_file_atomically
from attnscope.report import html_page, layer_head_panels, write_plotlyjs
from attnscope.tokentext import labels as token_labels
from attnscope.trace import Trace
from attnscope.vlm.heatmap import overlay, overlay_figure, token_heatmaps
from attnscope.vlm.images import OVERLAY_SIDE, fit_size, resized
from attnscope.vlm.layout import ImageLayout
from attnscope.vlm.metrics import visual_entropy, visual_mass

MAX_OVERLAYS = 24  # token positions drawn per run


def visual_head_maps(trace: Trace) -> go.Figure:
    """Layer x head maps: visual mass (mean over the response rows, or the last row) and visual
    entropy at the last row (renormalised over image tokens, needs kept queries/keys)."""
    start, end = trace.spans.get("response", (len(trace) - 1, len(trace)))
    panels = {"visual mass": visual_mass(trace)[..., start:end].mean(-1)}
    if trace.qk:
        panels["visual entropy at the last row"] = visual_entropy(trace)
    labels = [["-"] * trace.n_heads for _ in trace.layers]
    return layer_head_panels(panels, trace.layers, labels, "Visual heads")


def overlay_positions(trace: Trace, limit: int = MAX_OVERLAYS) -> list[int]:
    """The response rows (the last prompt row without a response), at most ``limit``."""
    start, end = trace.spans.get("response", (len(trace) - 1, len(trace)))
    return list(range(start, min(end, start + limit)))


def write_overlays(
    trace: Trace,
    images: Sequence[Image.Image],
    run_dir: Path,
    positions: Sequence[int] | None = None,
) -> tuple[Path, list[Path]]:
    """Write ``overlays/t<pos>_image<i>.png`` for each position and image, and ``overlays.html``
    with the visual head maps and one interactive overlay per image (positions on a slider).
    Everything is drawn on copies of the images scaled down to ``OVERLAY_SIDE`` px, each embedded
    in the page once; the page loads plotly.js from ``plotly.min.js`` written beside it. Returns
    (html path, png paths)."""
    run_dir = Path(run_dir)
    spans = ImageLayout.of(trace).images
    previews = [
        resized(image, fit_size(span.size, OVERLAY_SIDE))
        for span, image in zip(spans, images, strict=True)
    ]
    positions = list(positions) if positions is not None else overlay_positions(trace)
    grids = [token_heatmaps(trace, pos) for pos in positions]  # [position][image] -> [rows, cols]
    # one colour scale per image for every token: 0 to the largest value any token gives it
    vmax = [max(float(per_image[i].max()) for per_image in grids) for i in range(len(spans))]
    folder = run_dir / "overlays"
    folder.mkdir(parents=True, exist_ok=True)
    pngs = []
    for pos, per_image in zip(positions, grids, strict=True):
        for span, preview, grid, top in zip(spans, previews, per_image, vmax, strict=True):
            png = folder / f"t{pos:04d}_image{span.name.split(':')[1]}.png"
            buffer = io.BytesIO()
            overlay(preview, grid, span, vmax=top).save(buffer, "png")
            write_file_atomically(png, buffer.getvalue())
            pngs.append(png)
    figures = [visual_head_maps(trace)]
    names = token_labels(trace.tokens)
    for i, (span, preview) in enumerate(zip(spans, previews, strict=True)):
        labelled = {
            f"token {pos} {names[pos]}": per_image[i]
            for pos, per_image in zip(positions, grids, strict=True)
        }
        title = f"attention on {span.name}, mean over layers and heads (slider: the token)"
        figures.append(overlay_figure(preview, labelled, span, title=title))
    title = f"attnscope VLM overlays: {trace.meta.get('model', '?')}"
    text = html.escape(f"{trace.meta.get('text', '')}[{trace.meta.get('generated_text', '')}]")
    summary = (
        f"<h1>{html.escape(title)}</h1><pre style='white-space:pre-wrap'>{text}</pre>"
        "<p>Each image's overlay uses one colour scale for every token (0 to the largest share "
        "any token puts on one patch), so tokens compare directly; the PNGs in overlays/ use the "
        "same scale.</p>"
    )
    page = run_dir / "overlays.html"
    write_file_atomically(page, html_page(summary, figures, title, plotlyjs_beside=True))
    write_plotlyjs(run_dir)
    return page, pngs


def response_visual_mass(trace: Trace) -> torch.Tensor:
    """Visual mass per layer, mean over heads and response rows (last row without). ``[L]``."""
    start, end = trace.spans.get("response", (len(trace) - 1, len(trace)))
    return visual_mass(trace)[..., start:end].mean((1, 2))
