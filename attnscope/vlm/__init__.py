"""Vision-language models: image spans on the patch grid, visual statistics, heatmaps.

from attnscope.vlm import analyze_image, visual_mass, token_heatmaps, overlay
trace = analyze_image(lm, "photo.jpg", "Describe the image.", generate=32)
"""

from attnscope.vlm.analyze import analyze_image
from attnscope.vlm.heatmap import image_attention, overlay, overlay_figure, token_heatmaps
from attnscope.vlm.images import ImageError, load_image
from attnscope.vlm.inputs import VisionInputs, prepare
from attnscope.vlm.layout import FAMILIES, ImageLayout, ImageSpan, image_layout
from attnscope.vlm.metrics import visual_entropy, visual_heads, visual_mass, visual_sinks

__all__ = [
    "FAMILIES",
    "ImageError",
    "ImageLayout",
    "ImageSpan",
    "VisionInputs",
    "analyze_image",
    "image_attention",
    "image_layout",
    "load_image",
    "overlay",
    "overlay_figure",
    "prepare",
    "token_heatmaps",
    "visual_entropy",
    "visual_heads",
    "visual_mass",
    "visual_sinks",
]
