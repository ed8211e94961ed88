"""attnscope command line. Subcommands:

  analyze    run a model on a prompt (or a JSONL corpus) and store its attention statistics
  models     list model aliases, kinds, sizes and whether their cache is built
  query      DuckDB SQL over the runs under a directory (tables `stats` and `runs`)
  dashboard  explore the runs under a directory in the browser
  rl-demo    GRPO with coupled attention credit vs plain, on a toy task
  vlm        where a VLM's tokens look in images, with interventions
  speech     cross-attention vs saliency and word timings on speech
  vit        a vision transformer's attention on an image vs its own saliency
  heads      the head taxonomy of a causal LM: one table of head scores and labels

`attnscope COMMAND --help` lists a subcommand's options and their defaults.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from attnscope.commands.common import LAYERS_SYNTAX
from attnscope.errors import AttnscopeError

# Only the parser lives here: each subcommand runs in its module of attnscope.commands, imported
# when it runs, so `--help` and the light subcommands start without torch.
SUBCOMMANDS = {  # name -> summary, as in the module docstring
    "analyze": "run a model on a prompt (or a JSONL corpus) and store its attention statistics",
    "models": "list model aliases, kinds, sizes and whether their cache is built",
    "query": "DuckDB SQL over the runs under a directory (tables `stats` and `runs`)",
    "dashboard": "explore the runs under a directory in the browser",
    "rl-demo": "GRPO with coupled attention credit vs plain, on a toy task",
    "vlm": "where a VLM's tokens look in images, with interventions",
    "speech": "cross-attention vs saliency and word timings on speech",
    "vit": "a vision transformer's attention on an image vs its own saliency",
    "heads": "the head taxonomy of a causal LM: one table of head scores and labels",
}
DEMO_PROMPT = (
    "Question: Tom has 3 boxes with 4 apples in each box. He eats 2 apples. "
    "How many apples are left?\nAnswer: Let's think step by step."
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's lines and appends each option's default, unless there is none
    (None, a flag's False) or the help text names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnscope", description=__doc__, formatter_class=HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, help="one of the subcommands above")

    def command(name: str) -> argparse.ArgumentParser:
        summary = SUBCOMMANDS[name]
        return sub.add_parser(name, description=summary, formatter_class=HelpFormatter)

    p = command("analyze")
    p.add_argument(
        "--model", default="gemma3-270m", help="alias (see `attnscope models`), directory or HF id"
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--prompt", default=DEMO_PROMPT, help="text to analyse (default: a demo word problem)"
    )
    source.add_argument(
        "--prompts",
        default=None,
        help='JSONL file of {"prompt": ..., "id": ...} lines: a resumable corpus run',
    )
    p.add_argument(
        "--generate",
        type=int,
        default=0,
        help="greedy tokens to generate after the prompt; 0 analyses the prompt alone",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="run the prompt (each prompt of --prompts) as a user turn under the model's chat "
        "template, the assistant's turn opened (instruct models, e.g. smollm2-135m-instruct)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (with --prompts)")
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="with --prompts: local (this process) or ray (Ray Data actors; attnscope[scale])",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="with --engine ray: the cluster (auto, HOST:6379, ray://HOST:10001; default: "
        "RAY_ADDRESS, else a local instance for this run)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="with --engine ray: actors (default: 1)"
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="with --engine ray: CPUs each actor reserves (default: 1)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="with --engine ray: GPUs each actor reserves; the model spans them (default: 0)",
    )
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run directory (with --prompts, an existing corpus run is "
        "resumed without it)",
    )
    p.add_argument(
        "--backend", default="auto", help="statistics backend: auto | chunked | dense | triton"
    )
    p.add_argument(
        "--fused",
        action="store_true",
        help="compute each captured layer's attention output with its statistics in one pass "
        "(exact_logits=False: faster on long inputs; logits within fp tolerance of SDPA)",
    )
    p.add_argument(
        "--layers", default=None, help=f"layers to capture (default: all): {LAYERS_SYNTAX}"
    )
    p.add_argument(
        "--keep-qk",
        default=None,
        help="layers whose queries/keys are kept for attention rows and heatmaps (default: "
        "all layers of a single run while they fit 64 MB as float16, none for a corpus): 'all' "
        "or " + LAYERS_SYNTAX,
    )

    command("models")

    p = command("query")
    p.add_argument("runs", help="runs root directory")
    p.add_argument("sql", help="one SELECT query")
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=60.0,
        help="seconds before the query is stopped; 0: none",
    )
    p.add_argument(
        "--max-rows",
        metavar="N",
        type=int,
        default=1000,
        help="rows printed; a longer result is cut, with a note",
    )
    p.add_argument(
        "--memory-limit",
        metavar="SIZE",
        default="2GB",
        help="DuckDB memory limit, e.g. 512MB or 8GB (a query needing more fails: no spilling)",
    )

    p = command("dashboard")
    p.add_argument("runs", nargs="?", default="runs", help="runs root directory")
    p.add_argument("--port", type=int, default=8050, help="port to serve on")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (the default serves only this machine)"
    )

    p = command("rl-demo")
    p.add_argument(
        "--steps", type=int, default=30, help="GRPO steps per arm (about 1 s each on 2 CPU cores)"
    )
    p.add_argument("--warmup", type=int, default=15, help="supervised warm-up steps")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default="rl-demo", help="directory for the log and the plot")

    p = command("vlm")
    p.add_argument("image", nargs="+", help="image file(s)")
    p.add_argument("--prompt", default="Describe the image.", help="question or instruction")
    p.add_argument("--model", default="tiny-llava", help="VLM alias, local directory or HF id")
    p.add_argument("--generate", type=int, default=16, help="greedy tokens to generate")
    p.add_argument(
        "--intervene",
        choices=["none", "boost", "carve"],
        default="none",
        help="boost: visual attention boosting, compared with a plain run; carve: contrastive "
        "attention mask, the question re-asked on the masked image",
    )
    p.add_argument(
        "--layers",
        default=None,
        help="decoder layers of the intervention: one contiguous START:END range, END excluded, "
        "e.g. 2:6 or 2: (default: boost 2 to the last, carve all)",
    )
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")

    p = command("speech")
    p.add_argument("audio", help="audio file soundfile reads (WAV, FLAC, OGG, MP3), any rate")
    p.add_argument("--model", default="whisper-tiny-en", help="Whisper-family alias or directory")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument(
        "--transcript", default=None, help="force this text (default: transcribe the audio)"
    )
    p.add_argument(
        "--saliency",
        default="gxi,occlusion",
        help="methods, comma-separated: gxi (gradient x input), occlusion, ig (integrated "
        "gradients: slow, about --steps x 1.5 times gxi, e.g. --saliency gxi,occlusion,ig)",
    )
    p.add_argument("--steps", type=int, default=32, help="integrated-gradients points (cost)")
    p.add_argument("--patch", default="20,80", help="occlusion patch: mel frames,mel bins (cost)")
    p.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass")
    p.add_argument("--deletion", default="0,0.1,0.3,0.5", help="deletion fractions ('' skips)")
    p.add_argument(
        "--token", type=int, default=None, help="token to plot (default: the most salient)"
    )
    p.add_argument("--offset", type=float, default=0.0, help="start of the window, seconds")
    p.add_argument(
        "--duration", type=float, default=None, help="length of the window, seconds (default: all)"
    )

    p = command("vit")
    p.add_argument("image", nargs="?", default=None, help="image file (default: a demo scene)")
    p.add_argument("--model", default="dinov2-small", help="DINOv2 alias or local directory")
    p.add_argument("--out", default="runs/vit", help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")

    p = command("heads")
    p.add_argument("--model", default="gemma3-270m", help="causal LM alias, directory or HF id")
    p.add_argument("--text", default=None, help="detector text (default: English paragraphs)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens of the detector text")
    p.add_argument("--random", type=int, default=50, help="random tokens, repeated (induction)")
    p.add_argument(
        "--retrieval", type=int, default=0, help="needle prompts for retrieval scores (0: none)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens and needles")
    p.add_argument("--out", default=None, help="run directory to write (trace + heads.parquet)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runner = importlib.import_module(f"attnscope.commands.{args.command.replace('-', '_')}")
    try:
        return runner.run(args)
    except (AttnscopeError, ValueError) as err:
        print(f"attnscope: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`attnscope models | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
