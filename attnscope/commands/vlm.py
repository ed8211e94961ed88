"""``attnscope vlm``: analyse images + a prompt (optionally with an intervention) and write the run
directory: trace, report.html, overlays.html and overlay PNGs (plus CARVE's images)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from attnscope.commands.common import layer_count, parse_layers, refuse_existing
from attnscope.errors import AttnscopeError
from attnscope.interventions import VisualBoost, carve
from attnscope.models import load
from attnscope.models.loaded import LoadedModel
from attnscope.report import write_report
from attnscope.trace import Trace
from attnscope.vlm.analyze import analyze_image
from attnscope.vlm.images import ImageSource, load_images
from attnscope.vlm.report import response_visual_mass, write_overlays

Intervene = Literal["none", "boost", "carve"]


def run(args: argparse.Namespace) -> int:
    layers = parse_layers(args.layers) if args.layers else None
    out = Path(args.out)
    refuse_existing(out, args.overwrite)
    print(f"loading {args.model} ...", file=sys.stderr)
    lm = load(args.model)
    result = run_vlm(
        lm,
        args.image,
        args.prompt,
        out,
        generate=args.generate,
        intervene=args.intervene,
        layers=None if layers is None else layers.span(layer_count(lm)),
        overwrite=args.overwrite,
    )
    trace = result.trace
    print(f"{len(trace)} tokens {trace.spans}, {len(trace.layers)} layers x {trace.n_heads} heads")
    for name, value in result.notes.items():
        print(f"{name}: {value}")
    print(
        f"overlays: {result.overlays.resolve()} ({len(result.pngs)} PNGs in "
        f"{result.path / 'overlays'})"
    )
    print(f"report:   {result.report.resolve()}")
    return 0


@dataclass
class VlmRun:
    trace: Trace
    path: Path
    report: Path
    overlays: Path  # overlays.html
    pngs: list[Path]
    notes: dict[str, str] = field(default_factory=dict)  # answers and extra files, for the user


def run_vlm(
    lm: LoadedModel,
    images: ImageSource | list[ImageSource],
    prompt: str,
    out: str | Path,
    *,
    generate: int = 16,
    intervene: Intervene = "none",
    layers: tuple[int, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> VlmRun:
    """Analyse and write the run into ``out`` (an existing one is replaced only if ``overwrite``).
    ``boost``: VisualBoost on decoder ``layers`` (default: its own), compared with a plain run;
    ``carve``: the CARVE mask of the question over ``layers`` (default all), the masked / cropped
    images and the re-asked answer."""
    out = Path(out)
    refuse_existing(out, overwrite)
    loaded = load_images(images)
    notes: dict[str, str] = {}
    extra: dict[str, Image.Image] = {}
    if intervene == "carve":
        if len(loaded) != 1:
            raise AttnscopeError(f"CARVE masks one image, {len(loaded)} given")
        result = carve(lm, loaded[0], prompt, layers=layers, generate=generate, progress=progress)
        trace = result.trace
        notes.update(answer=result.original_answer, carve_answer=result.answer)
        extra = {
            "mask.png": Image.fromarray(result.mask),
            "masked.png": result.masked,
            "cropped.png": result.cropped,
        }
    elif intervene == "boost":  # the boosted run first: a bad layer range fails before any work
        boost = VisualBoost() if layers is None else VisualBoost(start=layers[0], end=layers[1])
        trace = analyze_image(lm, loaded, prompt, generate, intervention=boost, progress=progress)
        plain = analyze_image(lm, loaded, prompt, generate, progress=progress)
        trace.meta["baseline"] = {
            "generated_text": plain.meta["generated_text"],
            "visual_mass": response_visual_mass(plain).tolist(),
        }
        edit = trace.meta["intervention"]
        notes["answer"] = plain.meta["generated_text"]
        notes["boosted_answer"] = trace.meta["generated_text"]
        notes["edited rows, visual mass before -> after"] = " ".join(
            f"L{k}:{v:.3f}->{edit['mass_after'][k]:.3f}" for k, v in edit["mass_before"].items()
        )
        notes["response visual mass, plain"] = _per_layer(plain)
        notes["response visual mass, boosted"] = _per_layer(trace)
    else:
        trace = analyze_image(lm, loaded, prompt, generate, progress=progress)
        notes["answer"] = trace.meta["generated_text"]
    trace.save(out, overwrite=overwrite)
    for name, image in extra.items():
        image.save(out / name)
        notes[name] = str(out / name)
    page, pngs = write_overlays(trace, loaded, out)
    return VlmRun(trace, out, write_report(trace, out), page, pngs, notes)


def _per_layer(trace: Trace) -> str:
    """Visual mass of the response per layer, as text."""
    mass = response_visual_mass(trace).tolist()
    return " ".join(f"L{layer}:{v:.3f}" for layer, v in zip(trace.layers, mass, strict=True))
