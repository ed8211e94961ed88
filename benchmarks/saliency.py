"""Cost of each speech saliency method per second of audio (Whisper tiny.en, CPU).

Clips spoken by espeak-ng. Each (method, clip) runs in a fresh subprocess: model load, the model's
own transcript (greedy, captured), one warm-up forward and backward, then N timed runs of the
method over every output token (end of text included). Gradient methods cost one forward and
backward of the whole 30 s window per token (per IG point); occlusion one forward per patch.

    python benchmarks/saliency.py [--reps 3] [--steps 32] [--patch 10,20] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import PeakRSS, fmt_time, page_in, run_child, summary, write_section

TEXTS = ("open the window", "please open the window and let the fresh air come in")
METHODS = ("gradient_x_input", "occlusion", "integrated_gradients")


def child(method: str, wav: str, reps: int, steps: int, patch: str, batch_size: int) -> None:
    import attnscope as asc
    from attnscope.saliency import SaliencyCost, TeacherForced, speech_saliency
    from attnscope.speech import capture_cross_attention, load_audio, prepare
    from attnscope.speech.inputs import decoder_prefix

    torch.set_num_threads(os.cpu_count() or 1)
    lm = asc.load("whisper-tiny-en")
    page_in(lm.model)
    speech = prepare(lm, load_audio(wav))
    targets = capture_cross_attention(lm, speech).token_ids
    forced = TeacherForced(
        lm.model, speech.features, decoder_prefix(lm), targets, speech.n_mel_audio
    )
    baseline = speech.baseline[..., : speech.n_mel_audio]
    frames, bins = (int(x) for x in patch.split(","))
    cost = SaliencyCost(n_steps=steps, patch=(frames, bins), batch_size=batch_size)
    forced.target_log_probs(forced.audio.clone().requires_grad_()).sum().backward()  # warm-up
    times, result = [], None
    with PeakRSS() as rss:
        base = rss.peak
        for _ in range(reps):
            start = time.perf_counter()
            result = speech_saliency(forced, method, baseline, cost, progress=False)
            times.append(time.perf_counter() - start)
    error = result.completeness_error
    print(
        json.dumps(
            {
                "times": times,
                "peak_mb": (rss.peak - base) / 2**20,
                "seconds": speech.seconds,
                "tokens": len(targets),
                "completeness": None
                if error is None
                else [float(error.median()), float(error.max())],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32, help="integrated-gradients points")
    parser.add_argument("--patch", default="10,20", help="occlusion patch: mel frames,mel bins")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--child", nargs=6)
    args = parser.parse_args()
    if args.child:
        method, wav, reps, steps, patch, batch = args.child
        child(method, wav, int(reps), int(steps), patch, int(batch))
        return
    tmp = Path(tempfile.mkdtemp())
    rows = [
        "| method | audio | tokens | time | time per s of audio | time per token | peak |"
        " IG completeness error (median / max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, text in enumerate(TEXTS):
        wav = tmp / f"clip{i}.wav"
        espeak = shutil.which("espeak-ng") or sys.exit("espeak-ng is needed: make system-deps")
        subprocess.run([espeak, "-w", str(wav), "-s", "140", text], check=True)
        for method in args.methods:
            r = run_child(
                __file__,
                [
                    method,
                    str(wav),
                    str(args.reps),
                    str(args.steps),
                    args.patch,
                    str(args.batch_size),
                ],
            )
            med = summary(r["times"])[0]
            error = (
                "-" if r["completeness"] is None else "{:.1%} / {:.1%}".format(*r["completeness"])
            )
            rows.append(
                f"| {method} | {r['seconds']:.2f} s | {r['tokens']} | {fmt_time(r['times'])} | "
                f"{med / r['seconds']:.1f} s | {med / r['tokens']:.1f} s | {r['peak_mb']:.0f} MB "
                f"| {error} |"
            )
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    note = (
        f"Whisper tiny.en fp32 (SDPA), espeak-ng clips at 140 wpm, saliency of every output token "
        f"(end of text included) w.r.t. the audio part of the log-mel window (the 30 s padding "
        f"held fixed). Integrated gradients: {args.steps} evenly spaced points (trapezoid rule) from the "
        f"silence baseline (completeness error = |convergence delta| / |log p(x) - log p(silence)| "
        f"per token); occlusion: {args.patch.replace(',', ' mel frames x ')} mel bins patches, "
        f"KL score; batch {args.batch_size}. Median of {args.reps} runs after a warm-up pass "
        f"(min-max); peak = RSS increase during the runs, sampled every 10 ms; torch threads = "
        f"{os.cpu_count()}. The CPU is shared with other jobs: treat times as upper bounds."
    )
    print(table)
    write_section(
        "Speech saliency cost (CPU)", "python benchmarks/saliency.py", note + "\n\n" + table
    )


if __name__ == "__main__":
    main()
