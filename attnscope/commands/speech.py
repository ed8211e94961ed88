"""``attnscope speech``: Whisper cross-attention against saliency, and word timings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attnscope.commands.common import refuse_existing
from attnscope.models import load
from attnscope.saliency import SaliencyCost
from attnscope.speech import (
    alignment_text,
    analyze_speech,
    load_audio,
    saliency_text,
    words_text,
    write_speech_run,
)


def run(args: argparse.Namespace) -> int:
    try:
        patch = tuple(int(x) for x in args.patch.split(","))
        fractions = tuple(float(x) for x in args.deletion.split(",") if x)
    except ValueError as err:
        raise ValueError(f"expected --patch FRAMES,BINS and --deletion F1,F2,...: {err}") from err
    if len(patch) != 2:
        raise ValueError(f"expected --patch FRAMES,BINS, got {args.patch!r}")
    out = Path(args.out)
    refuse_existing(out, args.overwrite)
    audio = load_audio(args.audio, offset=args.offset, duration=args.duration)
    print(f"loading {args.model} ...", file=sys.stderr)
    analysis = analyze_speech(
        load(args.model),
        audio,
        args.transcript,
        methods=tuple(m for m in args.saliency.split(",") if m),
        cost=SaliencyCost(n_steps=args.steps, patch=patch, batch_size=args.batch_size),
        deletion_fractions=fractions,
    )
    report = write_speech_run(analysis, out, token=args.token, overwrite=args.overwrite)
    print(f"transcript ({analysis.meta['mode']}): {analysis.transcript}")
    print(alignment_text(analysis))
    print(saliency_text(analysis))
    print(words_text(analysis))
    print(f"results: {out}")
    print(f"report:  {report.resolve()}")
    return 0
