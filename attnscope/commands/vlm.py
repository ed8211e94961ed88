"""``attnscope vlm``: analyse images + a prompt (optionally with an intervention) and write the run
directory: trace, report.html, overlays.html and overlay PNGs (plus CARVE's images)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from attnscope.commands.common import layer_count, parse_layers, writing_run
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
    with writing_run(out, args.overwrite):
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
    """Analyse and write the run into ``out`` (an existing run is replaced only if ``overwrite``)
    in one atomic write, holding its writer lock throughout.
    ``boost``: VisualBoost on decoder ``layers`` (default: its own), compared with a plain run;
    ``carve``: the CARVE mask of the question over ``layers`` (default all), the masked / cropped
    images and the re-asked answer."""
    out = Path(out)
    with writing_run(out, overwrite):
        loaded = load_images(images)
        trace, notes, extra = _analyse(lm, loaded, prompt, generate, intervene, layers, progress)
        overlays: list[Path] = []  # overlays.html, then the PNGs, relative to the run directory

        def fill(tmp: Path) -> None:  # everything goes into the run's temporary directory
            for name, image in extra.items():
                image.save(tmp / name)
            page, pngs = write_overlays(trace, loaded, tmp)
            overlays.extend(p.relative_to(tmp) for p in (page, *pngs))
            write_report(trace, tmp)

        trace.save(out, overwrite=overwrite, extra=fill)
    notes.update({name: str(out / name) for name in extra})
    page, *pngs = [out / p for p in overlays]
    return VlmRun(trace, out, out / "report.html", page, pngs, notes)


def _analyse(
    lm: LoadedModel,
    loaded: list[Image.Image],
    prompt: str,
    generate: int,
    intervene: Intervene,
    layers: tuple[int, int] | None,
    progress: bool,
) -> tuple[Trace, dict[str, str], dict[str, Image.Image]]:
    """The run's trace, notes for the user and extra images (CARVE's), by ``intervene``."""
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
    return trace, notes, extra


def _per_layer(trace: Trace) -> str:
    """Visual mass of the response per layer, as text."""
    mass = response_visual_mass(trace).tolist()
    return " ".join(f"L{layer}:{v:.3f}" for layer, v in zip(trace.layers, mass, strict=True))
