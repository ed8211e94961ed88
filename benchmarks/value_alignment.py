"""Head-taxonomy reproductions (issue 17): raw vs value-norm sink mass on Gemma-3-270M (Kobayashi et
al. 2020) and derived vs published Whisper tiny.en alignment heads, as reproduction-table rows.

    python benchmarks/value_alignment.py [--sink-texts 16] [--clips 8] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import attnscope as asc
from attnscope.findings import markdown
from attnscope.findings.speech import alignment_heads_row, alignment_heads_verdict
from attnscope.findings.texts import SPEECH_SENTENCES, take
from attnscope.findings.valuesinks import measure_value_sinks
from attnscope.speech import alignment_heads

sys.path.insert(0, str(Path(__file__).parent))
from harness import write_section

SECTION = "Head taxonomy: value-norm sinks and Whisper alignment heads (CPU)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sink-texts", type=int, default=16, help="paragraphs, T = 64 tokens")
    parser.add_argument("--clips", type=int, default=8, help="sentences spoken word by word")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    load = [os.getloadavg()[0]]
    sinks = measure_value_sinks(asc.load("gemma3-270m"), args.sink_texts)
    whisper = asc.load("whisper-tiny-en")
    heads = alignment_heads(whisper, take(SPEECH_SENTENCES, args.clips, "speech sentences"))
    load.append(os.getloadavg()[0])
    table = heads.table().to_pylist()
    per_head = "\n".join(
        f"| ({r['layer']},{r['head']}) | {r['boundary_error']:.3f} | {r['word_mass']:.2f} | "
        f"{r['rank']} | {'yes' if r['published'] else ''} |"
        for r in sorted(table, key=lambda r: r["rank"])
    )
    verdicts = f"- value-norm sinks: {sinks.verdict()}\n- alignment heads: {alignment_heads_verdict(heads)}"
    body = (
        f"One pass, torch threads = {torch.get_num_threads()}; value-norm sinks {sinks.seconds:.0f} s, "
        f"alignment heads {heads.seconds:.0f} s wall; 1-minute load average {load[0]:.1f} at the "
        f"start and {load[1]:.1f} at the end on {os.cpu_count()} cores (shared machine).\n\n"
        f"{verdicts}\n\n{markdown([sinks.row(), alignment_heads_row(heads)])}\n\n"
        "Every decoder cross-attention head of whisper-tiny-en, best first (boundary error: "
        "seconds, mean over clips of the median word-boundary error; word mass: share of a "
        "word's attention inside its true frames):\n\n"
        "| head (layer, head) | boundary error (s) | word mass | rank | published |\n"
        f"|---|---|---|---|---|\n{per_head}"
    )
    print(body)
    if not args.no_write:
        command = "python benchmarks/value_alignment.py" + "".join(f" {a}" for a in sys.argv[1:])
        write_section(SECTION, command, body)


if __name__ == "__main__":
    main()
