"""Model inputs for images + a prompt, with the image layout read from what the processor wrote."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from attnscope.errors import AttnscopeError
from attnscope.models.loaded import LoadedModel
from attnscope.vlm.images import OVERLAY_SIDE, ImageSource, fit_size, load_images, resized
from attnscope.vlm.layout import ImageLayout, family_of, image_layout


@dataclass
class VisionInputs:
    tensors: Any  # processor output (BatchFeature): input_ids [1, T], pixel_values, ...
    layout: ImageLayout
    images: list[Image.Image]  # copies at most OVERLAY_SIDE px per side, for drawing overlays
    prompt: str  # the prompt as given to the processor (placeholders included)


def prepare(lm: LoadedModel, images: ImageSource | list[ImageSource], prompt: str) -> VisionInputs:
    """Load ``images`` and encode them with ``prompt``.

    Where the prompt holds no image placeholder, one per image is put in front of it. The
    processor gets the images at full size; only copies scaled down to ``OVERLAY_SIDE`` are kept,
    so a huge image is freed once encoded.
    """
    if lm.kind != "vlm" or lm.processor is None:
        raise AttnscopeError(
            f"{lm.name!r} is a {lm.kind} model without image tokens: image analyses need a "
            "vision-language model (e.g. tiny-llava, tiny-qwen2-vl)"
        )
    config = lm.model.config
    family = family_of(config)
    loaded = load_images(images)
    if family.image_token not in prompt:
        prompt = family.placeholder * len(loaded) + "\n" + prompt
    tensors = lm.processor(images=loaded, text=prompt, return_tensors="pt").to(lm.model.device)
    layout = image_layout(config, tensors, lm.processor.image_processor, [im.size for im in loaded])
    previews = [resized(im, fit_size(im.size, OVERLAY_SIDE)) for im in loaded]
    return VisionInputs(tensors, layout, previews, prompt)
