"""Reproductions of published attention findings on the packaged models: one table of
finding | published figure | attnscope on the packaged model | how measured.

Inputs are written by the project (attnscope/findings/texts.py and data/english.txt; speech by
espeak-ng). Gemma-3-270M: attention sinks, the preplan-and-anchor rhythm, local vs global heads,
raw vs value-norm sink mass; Whisper tiny.en: cross-attention vs saliency, derived vs published
alignment heads. Figures go to --figures as one HTML page (and PNGs when kaleido is installed). Not
a timing benchmark: one pass, wall times reported for scale.

    python benchmarks/fidelity.py [--sink-texts 32] [--problems 32] [--new-tokens 64]
        [--head-texts 16] [--value-texts 16] [--clips 6] [--word-clips 8]
        [--saliency gradient_x_input] [--shuffles 2000] [--figures benchmarks/figures] [--no-write]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import captum
import torch
import transformers

import attnscope as asc
from attnscope.findings import (
    markdown,
    measure_heads,
    measure_rhythm,
    measure_sinks,
    measure_speech,
)
from attnscope.findings.speech import alignment_heads_row, alignment_heads_verdict
from attnscope.findings.texts import SPEECH_SENTENCES, take
from attnscope.findings.valuesinks import measure_value_sinks
from attnscope.speech import AlignmentHeads, alignment_heads

sys.path.insert(0, str(Path(__file__).parent))
from harness import write_section

SECTION = "Reproductions of published attention findings (CPU)"


def save_figures(figures: dict, directory: Path) -> list[Path]:
    """Every plotly figure on one page ``fidelity.html`` (plotly.js from its CDN, once) and, with
    kaleido, each as ``NAME.png``."""
    directory.mkdir(parents=True, exist_ok=True)
    sections = [
        f"<h2>{name.removeprefix('fidelity_').replace('_', ' ')}</h2>\n"
        + fig.to_html(full_html=False, include_plotlyjs="cdn" if i == 0 else False)
        for i, (name, fig) in enumerate(figures.items())
    ]
    page = directory / "fidelity.html"
    page.write_text(
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>attnscope: reproductions of '
        "published attention findings</title></head><body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    written = [page]
    if importlib.util.find_spec("kaleido") is not None:
        for name, fig in figures.items():
            fig.write_image(directory / f"{name}.png", width=1000, height=550)
            written.append(directory / f"{name}.png")
    return written


def per_head_table(heads: AlignmentHeads) -> str:
    """Every decoder cross-attention head of the model, best word timing first."""
    rows = sorted(heads.table().to_pylist(), key=lambda r: r["rank"])
    lines = [
        f"| ({r['layer']},{r['head']}) | {r['boundary_error']:.3f} | {r['word_mass']:.2f} | "
        f"{r['rank']} | {'yes' if r['published'] else ''} |"
        for r in rows
    ]
    return (
        f"Every decoder cross-attention head of {heads.model}, best first (boundary error: "
        "seconds, mean over clips of the median word-boundary error; word mass: share of a "
        "word's attention inside its true frames):\n\n"
        "| head (layer, head) | boundary error (s) | word mass | rank | published |\n"
        "|---|---|---|---|---|\n" + "\n".join(lines)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sink-texts", type=int, default=32, help="paragraphs for the sink ratio")
    parser.add_argument("--problems", type=int, default=32, help="word problems for the rhythm")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per problem")
    parser.add_argument("--head-texts", type=int, default=16, help="paragraphs for head spans")
    parser.add_argument("--value-texts", type=int, default=16, help="paragraphs, value norms")
    parser.add_argument("--clips", type=int, default=6, help="synthesised speech clips")
    parser.add_argument("--word-clips", type=int, default=8, help="word-by-word clips, heads")
    parser.add_argument("--saliency", default="gradient_x_input", help="gxi, ig or occlusion")
    parser.add_argument("--shuffles", type=int, default=2000, help="random draws for baselines")
    parser.add_argument("--figures", type=Path, default=Path(__file__).parent / "figures")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    load_average = [os.getloadavg()[0]]
    load_seconds = {}

    clock = time.perf_counter()
    gemma = asc.load("gemma3-270m")
    load_seconds["gemma3-270m"] = time.perf_counter() - clock
    sinks = measure_sinks(gemma, args.sink_texts)
    rhythm = measure_rhythm(gemma, args.problems, args.new_tokens, n_shuffles=args.shuffles)
    heads = measure_heads(gemma, args.head_texts)
    value_sinks = measure_value_sinks(gemma, args.value_texts)
    del gemma
    clock = time.perf_counter()
    whisper = asc.load("whisper-tiny-en")
    load_seconds["whisper-tiny-en"] = time.perf_counter() - clock
    speech = measure_speech(whisper, args.clips, args.saliency)
    sentences = take(SPEECH_SENTENCES, args.word_clips, "speech sentences")
    alignment = alignment_heads(whisper, sentences)
    total = time.perf_counter() - start
    load_average.append(os.getloadavg()[0])

    results = {
        "sinks": sinks,
        "rhythm": rhythm,
        "heads": heads,
        "value-norm sinks": value_sinks,
        "speech": speech,
    }
    figures = {
        "fidelity_sinks_per_layer": sinks.figure(),
        "fidelity_head_span": heads.figure(),
        "fidelity_rhythm_sample": rhythm.figure(),
        "fidelity_speech_alignment": speech.figure(),
    }
    written = save_figures(figures, args.figures)
    table = markdown([*(r.row() for r in results.values()), alignment_heads_row(alignment)])
    verdicts = "\n".join(
        [
            *(f"- {name}: {r.verdict()}" for name, r in results.items()),
            f"- alignment heads: {alignment_heads_verdict(alignment)}",
        ]
    )
    timing = ", ".join(
        f"{name} {r.seconds:.0f} s" for name, r in {**results, "alignment": alignment}.items()
    )
    loads = ", ".join(f"{name} {s:.0f} s" for name, s in load_seconds.items())
    png = "" if any(p.suffix == ".png" for p in written) else " (no PNG: kaleido is not installed)"
    try:
        shown = [str(p.relative_to(Path.cwd())) for p in written]
    except ValueError:
        shown = [str(p) for p in written]
    note = (
        f"One pass, torch threads = {torch.get_num_threads()}; transformers "
        f"{transformers.__version__}, captum {captum.__version__}, attnscope {asc.__version__}. "
        f"Wall time {total:.0f} s in all: {timing}; model loads {loads}; 1-minute load average "
        f"{load_average[0]:.1f} at the start and {load_average[1]:.1f} at the end on "
        f"{os.cpu_count()} cores (shared machine). Gemma-3-270M is the "
        "packaged GGUF Q4_K_M checkpoint dequantised to fp32, SDPA. Published figures are "
        "quoted from the papers as we read them (approximate; not re-checked offline). "
        f"Figures: {', '.join(shown)}{png}.\n\nAgreement with the papers:\n\n{verdicts}"
    )
    print(verdicts)
    print(table)
    if not args.no_write:
        command = "python benchmarks/fidelity.py" + "".join(f" {a}" for a in sys.argv[1:])
        write_section(SECTION, command, f"{note}\n\n{table}\n\n{per_head_table(alignment)}")


if __name__ == "__main__":
    main()
