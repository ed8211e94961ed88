"""``attnscope`` command line: analyze, models, query, dashboard."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from attnscope.errors import AttnscopeError, MissingDependencyError, RunExistsError

DEMO_PROMPT = (
    "Question: Tom has 3 boxes with 4 apples in each box. He eats 2 apples. "
    "How many apples are left?\nAnswer: Let's think step by step."
)


def _analyze(args: argparse.Namespace) -> int:
    out = Path(args.out)
    layers = _int_list(args.layers)
    keep_qk = True if args.keep_qk == "all" else (_int_list(args.keep_qk) or False)
    if args.prompts:
        return _analyze_corpus(args, out, layers, keep_qk)

    from attnscope.analyze import analyze
    from attnscope.models import load
    from attnscope.report import write_report

    if out.exists() and not args.overwrite:  # refuse before the slow part
        raise RunExistsError(f"run directory {out} already exists; pass --overwrite to replace it")
    print(f"loading {args.model} ...", file=sys.stderr)
    lm = load(args.model)
    trace = analyze(
        lm,
        args.prompt,
        generate=args.generate,
        backend=args.backend,
        layers=layers,
        keep_qk=keep_qk,
    )
    trace.save(out, overwrite=args.overwrite)
    report = write_report(trace, out)
    groups = trace.head_groups()
    print(
        f"{len(trace)} tokens ({trace.spans}) x {len(trace.layers)} layers x {trace.n_heads} heads,"
        f" backend {trace.meta['backend']}, {trace.meta['seconds']:.1f} s"
    )
    if trace.meta.get("generated_text"):
        print(f"generated: {trace.meta['generated_text']!r}")
    print(
        f"local heads: {int(groups['local'].sum())}, global heads: {int(groups['global'].sum())}, "
        f"sink heads: {int(trace.sink_heads().sum())}"
    )
    print(f"results: {out / 'stats.parquet'} and {out / 'trace.json'}")
    print(f"report:  {report.resolve()}")
    return 0


def _analyze_corpus(
    args: argparse.Namespace, out: Path, layers: list[int] | None, keep_qk: list[int] | bool
) -> int:
    from attnscope.corpus import analyze_corpus, read_prompts
    from attnscope.corpus_report import write_corpus_report
    from attnscope.store.runs import sql_string

    summary = analyze_corpus(
        args.model,  # loaded only once the run directory is known to be new or resumable
        read_prompts(args.prompts),
        generate=args.generate,
        out=out,
        batch_size=args.batch_size,
        backend=args.backend,
        layers=layers,
        keep_qk=keep_qk,
        overwrite=args.overwrite,
    )
    resumed = f" ({len(summary.resumed)} from an earlier run)" if summary.resumed else ""
    print(f"{len(summary.done)} prompts done{resumed}, {len(summary.skipped)} skipped")
    for pid, error in summary.skipped.items():
        print(f"  skipped {pid!r}: {error}")
    sql = (
        f"SELECT prompt, avg(waad) AS waad FROM stats WHERE run = {sql_string(out.name)} "
        "GROUP BY prompt ORDER BY prompt"
    )
    print(f"results: {out} (corpus.json, one run per prompt in prompts/<id>/)")
    if summary.done:
        print(f"report:  {write_corpus_report(out)}")
    print(f"query:   attnscope query {_shell_quote(str(out.parent))} {_shell_quote(sql)}")
    return 0


def _shell_quote(text: str) -> str:
    """``text`` as one shell word: in double quotes when that is safe (readable SQL)."""
    if any(c in text for c in '"$`\\!'):
        return shlex.quote(text)
    return f'"{text}"'


def _int_list(text: str | None) -> list[int] | None:
    """``"0,3,5"`` -> [0, 3, 5]; a clear error for anything else."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError as err:
        raise ValueError(f"expected comma-separated layer indices, got {text!r}") from err


def _models(args: argparse.Namespace) -> int:
    from attnscope.models.registry import ALIASES

    print(f"{'alias':<16} {'kind':<10} {'cached':<7} {'size':<22} description")
    for a in ALIASES.values():
        cached = "yes" if a.is_cached() else "no"
        print(f"{a.name:<16} {a.kind:<10} {cached:<7} {a.size:<22} {a.description}")
    return 0


def _query(args: argparse.Namespace) -> int:
    from attnscope.store import RunStore

    table = RunStore(args.runs).sql(args.sql)
    rows = [[str(v) for v in row.values()] for row in table.to_pylist()]
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
        for i, c in enumerate(table.column_names)
    ]
    for line in [table.column_names, *rows]:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    try:
        from attnscope.dashboard import create_app
    except ModuleNotFoundError as err:
        if err.name != "dash":
            raise
        raise MissingDependencyError(
            "the dashboard needs Dash: pip install 'attnscope[dashboard]'"
        ) from err

    app = create_app(args.runs)
    if args.host not in ("127.0.0.1", "localhost"):
        print(
            f"warning: serving on {args.host}: anyone who can reach this address can read "
            f"the runs under {args.runs}",
            file=sys.stderr,
        )
    url = f"http://{args.host}:{args.port}/"
    print(f"attnscope dashboard: {url} (runs under {args.runs})", flush=True)
    app.run(host=args.host, port=args.port, debug=False)
    return 0


def _rl_demo(args: argparse.Namespace) -> int:
    from attnscope.rl.demo import marked, run_demo

    result = run_demo(args.out, steps=args.steps, warmup_steps=args.warmup, seed=args.seed)
    window = max(1, min(20, args.steps // 4))
    for arm, logs in result.history.items():
        overhead = sorted(log.credit_overhead_pct for log in logs)[len(logs) // 2]
        print(
            f"{arm:>8}: reward {result.mean_reward(arm, first=window):.3f} (first {window} steps)"
            f" -> {result.mean_reward(arm, last=window):.3f} (last {window}),"
            f" median credit overhead {overhead:.1f}% of a step"
        )
    sample = result.history["coupled"][-1].sample
    print(
        f"boosted tokens of a sample (prompt {sample.prompt!r}):",
        marked(sample.tokens, sample.gamma),
    )
    print(f"log:  {result.log.resolve()}")
    print(f"plot: {result.plot.resolve()}")
    return 0


def _vlm(args: argparse.Namespace) -> int:
    from attnscope.models import load
    from attnscope.vlm.run import run_vlm

    layers = None
    if args.layers:
        try:
            start, end = (int(x) for x in args.layers.split(":"))
        except ValueError as err:
            raise ValueError(f"expected --layers START:END, got {args.layers!r}") from err
        layers = (start, end)
    out = Path(args.out)
    if out.exists() and not args.overwrite:  # refuse before loading the model
        raise RunExistsError(f"run directory {out} already exists; pass --overwrite to replace it")
    print(f"loading {args.model} ...", file=sys.stderr)
    run = run_vlm(
        load(args.model),
        args.image,
        args.prompt,
        out,
        generate=args.generate,
        intervene=args.intervene,
        layers=layers,
        overwrite=args.overwrite,
    )
    trace = run.trace
    print(f"{len(trace)} tokens {trace.spans}, {len(trace.layers)} layers x {trace.n_heads} heads")
    for name, value in run.notes.items():
        print(f"{name}: {value}")
    print(f"overlays: {run.overlays.resolve()} ({len(run.pngs)} PNGs in {run.path / 'overlays'})")
    print(f"report:   {run.report.resolve()}")
    return 0


def _speech(args: argparse.Namespace) -> int:
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

    out = Path(args.out)
    if out.exists() and not args.overwrite:  # refuse before the slow part
        raise RunExistsError(f"run directory {out} already exists; pass --overwrite to replace it")
    audio = load_audio(args.audio, offset=args.offset, duration=args.duration)
    try:
        patch = tuple(int(x) for x in args.patch.split(","))
        fractions = tuple(float(x) for x in args.deletion.split(",") if x)
    except ValueError as err:
        raise ValueError(f"expected --patch FRAMES,BINS and --deletion F1,F2,...: {err}") from err
    if len(patch) != 2:
        raise ValueError(f"expected --patch FRAMES,BINS, got {args.patch!r}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnscope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="run a model on a prompt and store its attention statistics")
    p.add_argument("--model", default="gemma3-270m", help="alias, local directory or cached HF id")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", default=DEMO_PROMPT)
    source.add_argument(
        "--prompts",
        default=None,
        help='JSONL file of {"prompt": ..., "id": ...} lines: a resumable corpus run',
    )
    p.add_argument("--generate", type=int, default=0, help="greedy tokens to generate")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (with --prompts)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run directory (with --prompts, an existing corpus run is "
        "resumed without it)",
    )
    p.add_argument("--backend", default="auto", help="auto | chunked | dense | triton")
    p.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    p.add_argument(
        "--keep-qk",
        default=None,
        help="layers whose queries/keys are kept for heatmaps: 'all' or '0,5,11'",
    )
    p.set_defaults(func=_analyze)

    p = sub.add_parser("models", help="list model aliases and whether their cache is built")
    p.set_defaults(func=_models)

    p = sub.add_parser("query", help="DuckDB SQL over runs: tables `stats` and `runs`")
    p.add_argument("runs", help="runs root directory")
    p.add_argument("sql")
    p.set_defaults(func=_query)

    p = sub.add_parser("dashboard", help="explore the runs under a directory in the browser")
    p.add_argument("runs", nargs="?", default="runs", help="runs root directory (default: runs)")
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.set_defaults(func=_dashboard)
    p = sub.add_parser("rl-demo", help="GRPO with coupled attention credit vs plain, on a toy task")
    p.add_argument("--steps", type=int, default=200, help="GRPO steps per arm")
    p.add_argument("--warmup", type=int, default=15, help="supervised warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="rl-demo", help="directory for the log and the plot")
    p.set_defaults(func=_rl_demo)
    p = sub.add_parser("vlm", help="where a VLM's tokens look in images, with interventions")
    p.add_argument("image", nargs="+", help="image file(s)")
    p.add_argument("--prompt", default="Describe the image.")
    p.add_argument("--model", default="tiny-llava", help="VLM alias, local directory or HF id")
    p.add_argument("--generate", type=int, default=16, help="greedy tokens to generate")
    p.add_argument("--intervene", choices=["none", "boost", "carve"], default="none")
    p.add_argument(
        "--layers",
        default=None,
        help="decoder layers START:END of the intervention (boost default: 2 to the last)",
    )
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=_vlm)
    p = sub.add_parser("speech", help="cross-attention vs saliency and word timings on speech")
    p.add_argument("audio", help="audio file soundfile reads (WAV, FLAC, OGG, MP3), any rate")
    p.add_argument("--model", default="whisper-tiny-en", help="Whisper-family alias or directory")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--transcript", default=None, help="force this text (default: transcribe)")
    p.add_argument("--saliency", default="ig,gxi,occlusion", help="methods, comma-separated")
    p.add_argument("--steps", type=int, default=32, help="integrated-gradients points (cost)")
    p.add_argument("--patch", default="10,20", help="occlusion patch: mel frames,mel bins (cost)")
    p.add_argument("--batch-size", type=int, default=4, help="inputs per forward pass")
    p.add_argument("--deletion", default="0,0.1,0.2,0.3,0.5", help="deletion fractions ('' skips)")
    p.add_argument("--token", type=int, default=None, help="token to plot (default: most salient)")
    p.add_argument("--offset", type=float, default=0.0, help="start of the window, seconds")
    p.add_argument("--duration", type=float, default=None, help="length of the window, seconds")
    p.set_defaults(func=_speech)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (AttnscopeError, ValueError) as err:
        print(f"attnscope: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
