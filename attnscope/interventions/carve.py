"""CARVE-style contrastive attention masks: keep the pixels the question looks at more than a general
instruction does, and ask again on them.

1. Attention on the image tokens of the rows that produce the first ``steps`` answer tokens,
   mean over heads, for the question and for a general instruction, per layer of ``layers``.
2. Fuse over time steps (mean), scale each layer's map so that uniform attention is 1, contrast
   A_q / (A_g + lam) per layer and fuse over layers (mean).
3. Upsample the contrast bilinearly, keep the top ``top_p`` fraction of pixels and, of those, the
   ``top_k`` connected regions (8-connected) with the largest total contrast.
4. Blank the other pixels, crop to the kept pixels' bounding box, ask the question again on the
   masked image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from attnscope.errors import AttnscopeError
from attnscope.models.loaded import LoadedModel
from attnscope.trace import Trace
from attnscope.vlm.analyze import analyze_image
from attnscope.vlm.heatmap import image_attention
from attnscope.vlm.images import ImageSource, load_image
from attnscope.vlm.layout import ImageLayout, ImageSpan

GENERAL_INSTRUCTION = "Write a general description of the image."


@dataclass
class CarveResult:
    mask: np.ndarray  # bool [H, W]: pixels of the original image that are kept
    contrast: Tensor  # [rows, cols] fused contrast on the patch grid
    masked: Image.Image  # the image with the other pixels blanked
    cropped: Image.Image  # the kept pixels' bounding box of the original image
    answer: str  # the question asked again on the masked image
    original_answer: str  # the answer on the original image
    trace: Trace  # the question's run on the original image


def carve(
    lm: LoadedModel,
    image: ImageSource,
    question: str,
    *,
    general: str = GENERAL_INSTRUCTION,
    layers: tuple[int, int] | None = None,
    steps: int = 4,
    lam: float = 1.0,
    top_p: float = 0.2,
    top_k: int = 2,
    generate: int = 16,
    fill: tuple[int, int, int] = (0, 0, 0),
    progress: bool = False,
) -> CarveResult:
    """Contrastive attention mask of ``question`` against ``general`` over decoder ``layers``
    ([start, end), default all), the masked / cropped image and the re-asked answer."""
    if steps < 1 or top_k < 1 or not 0 < top_p <= 1 or lam <= 0:
        raise ValueError(
            f"need steps >= 1, top_k >= 1, 0 < top_p <= 1, lam > 0; got {steps}, {top_k}, "
            f"{top_p}, {lam}"
        )
    n_layers = lm.model.config.get_text_config().num_hidden_layers
    start, end = layers if layers is not None else (0, n_layers)
    if not 0 <= start < end <= n_layers:
        raise AttnscopeError(f"CARVE layers [{start}, {end}) outside the model's {n_layers} layers")
    picked = list(range(start, end))
    original = load_image(image)
    run = dict(layers=picked, progress=progress)
    asked = analyze_image(lm, original, question, generate=max(generate, steps), **run)
    described = analyze_image(lm, original, general, generate=steps, **run)
    spans = ImageLayout.of(asked).images
    if len(spans) != 1:
        raise AttnscopeError(f"CARVE masks one image; the prompt holds {len(spans)}")
    fused = contrast_map(step_maps(asked, steps), step_maps(described, steps), lam)
    contrast = spans[0].to_grid(fused)
    mask = region_mask(contrast, spans[0], top_p, top_k)
    masked = Image.composite(original, Image.new("RGB", original.size, fill), Image.fromarray(mask))
    ys, xs = mask.nonzero()
    cropped = original.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    again = analyze_image(lm, masked, question, generate=generate, keep_qk=False, **run)
    return CarveResult(
        mask=mask,
        contrast=contrast,
        masked=masked,
        cropped=cropped,
        answer=again.meta["generated_text"],
        original_answer=asked.meta["generated_text"],
        trace=asked,
    )


def step_maps(trace: Trace, steps: int) -> Tensor:
    """Head-mean attention on the image tokens of the rows that produce the first ``steps``
    answer tokens, averaged over those steps. ``[n_layers, N]``."""
    first = trace.spans["prompt"][1] - 1  # the last prompt row produces the first answer token
    if first + steps > len(trace):
        raise AttnscopeError(f"the run has {len(trace) - first} answer steps, {steps} asked")
    return image_attention(trace, list(range(first, first + steps))).mean(1)


def contrast_map(asked: Tensor, described: Tensor, lam: float) -> Tensor:
    """Per layer, maps ``[L, N]`` scaled to mean 1, A_q / (A_g + lam); mean over layers. ``[N]``."""

    def scaled(a: Tensor) -> Tensor:
        return a / a.mean(-1, keepdim=True)

    return (scaled(asked) / (scaled(described) + lam)).mean(0)


def region_mask(
    contrast: Tensor, span: ImageSpan, top_p: float, top_k: int, upsample: int = 8
) -> np.ndarray:
    """Pixels of the original image kept: top ``top_p`` of the upsampled ``contrast``
    ``[rows, cols]``, then its ``top_k`` connected regions by total contrast. bool ``[H, W]``."""
    rows, cols = contrast.shape
    up = F.interpolate(
        contrast[None, None].float(),
        size=(rows * upsample, cols * upsample),
        mode="bilinear",
        align_corners=False,
    )[0, 0]
    threshold = up.flatten().topk(max(1, round(top_p * up.numel()))).values[-1]
    labels = connected_components(up >= threshold)
    totals = torch.zeros(labels.numel() + 1).index_add_(0, labels.flatten(), up.flatten())
    totals[0] = float("-inf")  # background
    present = torch.unique(labels[labels > 0])
    kept = present[torch.argsort(totals[present], descending=True)[:top_k]]
    keep = torch.isin(labels, kept).numpy()
    left, top, right, bottom = (round(v) for v in span.box)
    region = Image.fromarray(keep).resize((right - left, bottom - top), Image.Resampling.NEAREST)
    full = np.zeros((span.size[1], span.size[0]), dtype=bool)
    full[top:bottom, left:right] = np.asarray(region)
    return full


def connected_components(foreground: Tensor) -> Tensor:
    """8-connected regions of a bool map ``[h, w]``: one positive label per region, 0 elsewhere."""
    h, w = foreground.shape
    fg = foreground.float()
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w) * fg
    while True:  # every pixel takes the largest label around it until nothing changes
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * fg
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown
