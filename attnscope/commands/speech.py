"""``attnscope speech``: Whisper cross-attention against saliency, and word timings."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from attnscope.commands.common import writing_run
from attnscope.models import load
from attnscope.saliency import SaliencyCost, method_name
from attnscope.speech import (
    alignment_text,
    analyze_speech,
    load_audio,
    saliency_text,
    words_text,
    write_speech_run,
)
from attnscope.speech.analysis import SpeechAnalysis, ig_seconds_per_token
from attnscope.speech.audio import AudioWarning


def run(args: argparse.Namespace) -> int:
    try:
        patch = tuple(int(x) for x in args.patch.split(","))
        fractions = tuple(float(x) for x in args.deletion.split(",") if x)
    except ValueError as err:
        raise ValueError(f"expected --patch FRAMES,BINS and --deletion F1,F2,...: {err}") from err
    if len(patch) != 2:
        raise ValueError(f"expected --patch FRAMES,BINS, got {args.patch!r}")
    methods = [m for m in args.saliency.split(",") if m]
    for m in methods:
        method_name(m)  # an unknown name fails before the model loads
    out = Path(args.out)
    with writing_run(out, args.overwrite):  # one writer, refused before the slow part
        with _audio_warnings_said():
            audio = load_audio(args.audio, offset=args.offset, duration=args.duration)
        print(f"loading {args.model} ...", file=sys.stderr)
        with _audio_warnings_said():
            analysis = analyze_speech(
                load(args.model),
                audio,
                args.transcript,
                methods=tuple(methods),
                cost=SaliencyCost(n_steps=args.steps, patch=patch, batch_size=args.batch_size),
                deletion_fractions=fractions,
            )
        report = write_speech_run(analysis, out, token=args.token, overwrite=args.overwrite)
    print(f"transcript ({analysis.meta['mode']}): {analysis.transcript}")
    print(alignment_text(analysis))
    print(saliency_text(analysis))
    if "integrated_gradients" not in analysis.saliency:
        print(_ig_skipped(analysis, methods, args.steps))
    print(words_text(analysis))
    print(f"results: {out}")
    print(f"report:  {report.resolve()}")
    return 0


def _ig_skipped(analysis: SpeechAnalysis, methods: list[str], n_steps: int) -> str:
    """What skipping integrated gradients saved, and the flag that computes it."""
    per_token = ig_seconds_per_token(analysis, n_steps)
    if per_token is None:
        cost = f"{n_steps} forward and backward passes of the whole window per token"
    else:
        n = len(analysis.tokens)
        cost = f"{_about(per_token)} per token, {_about(per_token * n)} for this clip's {n}"
    return (
        f"integrated gradients skipped (slow: {cost}); "
        f"add --saliency {','.join([*methods, 'ig'])} to compute it"
    )


def _about(seconds: float) -> str:
    if seconds >= 90:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds:.0f} s" if seconds >= 1 else "under 1 s"


@contextmanager
def _audio_warnings_said() -> Iterator[None]:
    """``AudioWarning``s raised inside are printed as ``attnscope: warning: ...`` (without Python's
    decoration) when the block ends; other warnings are shown as usual."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AudioWarning)
            yield
    finally:
        for w in caught:
            if issubclass(w.category, AudioWarning):
                print(f"attnscope: warning: {w.message}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
