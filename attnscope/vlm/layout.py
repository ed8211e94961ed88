"""Where each image's tokens sit in the LLM sequence and which patch-grid cell each one covers.

A model family is data (``FAMILIES``): how an image is written in a prompt, where the vision tower
sits, how many tokens each image gets and which region of the original image the grid covers.
LLaVA: a fixed ``side x side`` grid per image, one CLIP patch per token, the CLIP class token first
in the vision tower, after a shortest-edge resize and a centre crop. Qwen2-VL: a dynamic
``h/m x w/m`` grid per image from ``image_grid_thw`` (m = spatial merge size), each token merging
``m x m`` patches that sit next to each other in the packed vision sequence, the whole image resized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import ChannelDimension

from attnscope.errors import AttnscopeError
from attnscope.trace import Trace

Box = tuple[float, float, float, float]  # left, top, right, bottom in pixels of the original image
# one image: grid rows, grid cols, vision batch index, vision index of its first patch, merge size
Grid = tuple[int, int, int, int, int]


@dataclass(frozen=True)
class ImageSpan:
    """One image's tokens ``[start, end)`` in the LLM sequence, a ``rows x cols`` grid in row-major
    order, and where its patches sit in the vision tower."""

    name: str  # span name in trace.spans, "image:0", "image:1", ...
    start: int
    end: int
    rows: int
    cols: int
    box: Box  # region of the original image that the grid covers
    size: tuple[int, int]  # original image (width, height)
    vision_batch: int  # batch index of the image in the vision tower's input
    vision_start: int  # vision-tower token index of the image's first patch
    merge: int  # patches per grid cell side (1: one patch per token)

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def positions(self) -> Tensor:
        """LLM positions of the image tokens. ``[n]``."""
        return torch.arange(self.start, self.end)

    def vision_tokens(self) -> Tensor:
        """Vision-tower token indices (in batch ``vision_batch``) merged into each LLM token.
        ``[n, merge**2]``."""
        m2 = self.merge**2
        return self.vision_start + torch.arange(len(self))[:, None] * m2 + torch.arange(m2)

    def to_grid(self, values: Tensor) -> Tensor:
        """Per-token values ``[..., n]`` laid out on the patch grid ``[..., rows, cols]``."""
        return values.reshape(*values.shape[:-1], self.rows, self.cols)

    def cell_box(self, row: int, col: int) -> Box:
        """The region of the original image that grid cell (row, col) covers."""
        left, top, right, bottom = self.box
        w, h = (right - left) / self.cols, (bottom - top) / self.rows
        return (left + col * w, top + row * h, left + (col + 1) * w, top + (row + 1) * h)


@dataclass(frozen=True)
class ImageLayout:
    """The image spans of one sequence, in prompt order."""

    images: tuple[ImageSpan, ...]

    @property
    def spans(self) -> dict[str, tuple[int, int]]:
        return {s.name: (s.start, s.end) for s in self.images}

    @property
    def positions(self) -> Tensor:
        """LLM positions of every image token. ``[N]``."""
        return torch.cat([s.positions for s in self.images])

    def to_meta(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.images]

    @classmethod
    def from_meta(cls, meta: list[dict[str, Any]]) -> ImageLayout:
        return cls(
            tuple(
                ImageSpan(**{**d, "box": tuple(d["box"]), "size": tuple(d["size"])}) for d in meta
            )
        )

    @classmethod
    def of(cls, trace: Trace) -> ImageLayout:
        """The layout recorded in a trace by ``analyze_image``."""
        if not trace.meta.get("images"):
            raise AttnscopeError(
                "this trace has no image spans: analyse the image with attnscope.vlm.analyze_image"
            )
        return cls.from_meta(trace.meta["images"])


@dataclass(frozen=True)
class Family:
    """How one VLM architecture lays images out (data, see the module docstring)."""

    placeholder: str  # one image in a prompt, before the processor expands it
    image_token: str  # the token the processor repeats once per image token
    vision_stack: str  # module stack template of the vision tower's attention
    class_token: bool  # the vision tower puts a class token first in each image's sequence
    grids: Callable[[Any, dict], list[Grid]]  # (model config, processor output) -> per image
    view_box: Callable[[Any, tuple[int, int]], Box]  # (image processor, (w, h)) -> grid region


def _llava_grids(config: Any, tensors: dict) -> list[Grid]:
    if config.vision_feature_select_strategy != "default":
        raise AttnscopeError(
            "LLaVA image layouts are supported with vision_feature_select_strategy='default' "
            f"(one token per patch), not {config.vision_feature_select_strategy!r}"
        )
    side = config.vision_config.image_size // config.vision_config.patch_size
    return [(side, side, i, 1, 1) for i in range(tensors["pixel_values"].shape[0])]


def _center_crop_box(image_processor: Any, size: tuple[int, int]) -> Box:
    """CLIP-style preprocessing: shortest-edge resize, then a centre crop (ints as the processor)."""
    w, h = size
    if not getattr(image_processor, "do_resize", True):
        new_h, new_w = h, w
    else:
        new_h, new_w = get_resize_output_image_size(
            np.empty((1, h, w)),
            size=image_processor.size["shortest_edge"],
            default_to_square=False,
            input_data_format=ChannelDimension.FIRST,
        )
    if not getattr(image_processor, "do_center_crop", False):
        return (0.0, 0.0, float(w), float(h))
    ch, cw = image_processor.crop_size["height"], image_processor.crop_size["width"]
    top, left = (new_h - ch) // 2, (new_w - cw) // 2
    sx, sy = w / new_w, h / new_h
    return (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)


def _qwen2_vl_grids(config: Any, tensors: dict) -> list[Grid]:
    m = config.vision_config.spatial_merge_size
    grids, start = [], 0
    for t, h, w in tensors["image_grid_thw"].tolist():
        grids.append((h // m, w // m, 0, start, m))
        start += t * h * w
    return grids


def _whole_image(image_processor: Any, size: tuple[int, int]) -> Box:
    return (0.0, 0.0, float(size[0]), float(size[1]))


FAMILIES: dict[str, Family] = {
    "llava": Family(
        placeholder="<image>",
        image_token="<image>",
        vision_stack="model.vision_tower.encoder.layers.{}.self_attn",
        class_token=True,
        grids=_llava_grids,
        view_box=_center_crop_box,
    ),
    "qwen2_vl": Family(
        placeholder="<|vision_start|><|image_pad|><|vision_end|>",
        image_token="<|image_pad|>",
        vision_stack="model.visual.blocks.{}.attn",
        class_token=False,
        grids=_qwen2_vl_grids,
        view_box=_whole_image,
    ),
}


def family_of(config: Any) -> Family:
    """The layout family of a model config; a clear error for text-only or unknown models."""
    if getattr(config, "vision_config", None) is None:
        raise AttnscopeError(
            f"{config.model_type!r} is not a vision-language model: it has no image tokens"
        )
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise AttnscopeError(
            f"image layouts of {config.model_type!r} models are not supported; supported: "
            f"{sorted(FAMILIES)}"
        )
    return family


def image_layout(config: Any, tensors: dict, image_processor: Any, sizes: list) -> ImageLayout:
    """Spans and grids of the images in processor output ``tensors`` (one sequence).

    ``sizes``: (width, height) of each original image, in prompt order. Checks that the processor
    wrote as many image tokens per image as the grid has cells, in one contiguous run per image.
    """
    family = family_of(config)
    ids = tensors["input_ids"]
    if ids.shape[0] != 1:
        raise AttnscopeError(f"image layouts describe one sequence; got a batch of {ids.shape[0]}")
    found = (ids[0] == config.image_token_id).nonzero()[:, 0].tolist()
    if not found:
        raise AttnscopeError(
            f"the prompt holds no image token {family.image_token!r}: write "
            f"{family.placeholder!r} where each image goes (or leave it out to put images first)"
        )
    grids = family.grids(config, tensors)
    if len(grids) != len(sizes):
        raise AttnscopeError(f"{len(sizes)} images given, the processor encoded {len(grids)}")
    if sum(r * c for r, c, *_ in grids) != len(found):
        raise AttnscopeError(
            f"the sequence holds {len(found)} image tokens, the image grids "
            f"{[(r, c) for r, c, *_ in grids]} need {sum(r * c for r, c, *_ in grids)}"
        )
    spans, taken = [], 0
    for i, ((rows, cols, batch, vision_start, merge), size) in enumerate(
        zip(grids, sizes, strict=True)
    ):
        run = found[taken : taken + rows * cols]
        taken += rows * cols
        if run[-1] - run[0] + 1 != len(run):
            raise AttnscopeError(f"the tokens of image {i} are not contiguous in the sequence")
        spans.append(
            ImageSpan(
                name=f"image:{i}",
                start=run[0],
                end=run[-1] + 1,
                rows=rows,
                cols=cols,
                box=family.view_box(image_processor, size),
                size=(int(size[0]), int(size[1])),
                vision_batch=batch,
                vision_start=vision_start,
                merge=merge,
            )
        )
    return ImageLayout(tuple(spans))
