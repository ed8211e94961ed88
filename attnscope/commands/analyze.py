"""``attnscope analyze``: one prompt into a run directory, or a JSONL corpus into a corpus run."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from attnscope.atomic import claim
from attnscope.commands.common import (
    Layers,
    layer_count,
    parse_keep_qk,
    parse_layers,
    resolve,
    writing_run,
)
from attnscope.errors import AttnscopeError

# the options of --engine ray: argparse attribute -> RayEngine field (flag: --ray-address, ...)
RAY_OPTIONS = {
    "ray_address": "address",
    "workers": "workers",
    "cpus_per_worker": "cpus_per_worker",
    "gpus_per_worker": "gpus_per_worker",
}


def run(args: argparse.Namespace) -> int:
    layers = parse_layers(args.layers) if args.layers else None
    keep_qk = parse_keep_qk(args.keep_qk)
    given = [
        f"--{name.replace('_', '-')}" for name in RAY_OPTIONS if getattr(args, name) is not None
    ]
    if (args.engine == "ray" or given) and not args.prompts:
        raise AttnscopeError("--engine ray and its options take a corpus: add --prompts FILE.jsonl")
    if given and args.engine != "ray":
        raise AttnscopeError(f"{', '.join(given)} need --engine ray")
    if args.prompts:
        return _corpus(args, layers, keep_qk)
    return _single(args, layers, keep_qk)


def _engine(args: argparse.Namespace) -> Any:
    """``"local"``, or the RayEngine of the --engine ray options (defaults where not given)."""
    if args.engine == "local":
        return "local"
    from attnscope.scale import RayEngine

    options = {field: getattr(args, name) for name, field in RAY_OPTIONS.items()}
    return RayEngine(**{field: value for field, value in options.items() if value is not None})


def _single(args: argparse.Namespace, layers: Layers | None, keep_qk: Layers | bool) -> int:
    from attnscope.analyze import analyze, check_text
    from attnscope.models import load
    from attnscope.report import write_report

    out = Path(args.out)
    check_text(args.prompt)  # before the model loads
    with writing_run(out, args.overwrite):
        print(f"loading {args.model} ...", file=sys.stderr)
        lm = load(args.model)
        n_layers = layer_count(lm)
        trace = analyze(
            lm,
            args.prompt,
            generate=args.generate,
            chat=args.chat,
            backend=args.backend,
            exact_logits=not args.fused,
            layers=resolve(layers, n_layers),
            # without --keep-qk: every layer while they fit the default budget
            **({} if args.keep_qk is None else {"keep_qk": resolve(keep_qk, n_layers)}),
        )
        trace.save(out, overwrite=args.overwrite, extra=lambda tmp: write_report(trace, tmp))
    report = out / "report.html"
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


def _corpus(args: argparse.Namespace, layers: Layers | None, keep_qk: Layers | bool) -> int:
    from attnscope.corpus import analyze_corpus, read_prompts
    from attnscope.corpus_report import write_corpus_report
    from attnscope.mirror import RunMirror, is_uri
    from attnscope.models import load
    from attnscope.store.runs import sql_string

    mirror = RunMirror.of(args.out) if is_uri(args.out) else None
    out = Path(args.out) if mirror is None else mirror.staging  # a URI's run is staged here
    prompts = read_prompts(args.prompts)
    engine = _engine(args)
    with claim(out, "corpus run"):  # held until the report is written
        # the model is loaded only once the run directory is known to be new or resumable, unless
        # an open layer range needs its layer count first
        lm, n_layers = args.model, None
        if any(isinstance(c, Layers) and c.open_ended for c in (layers, keep_qk)):
            print(f"loading {args.model} ...", file=sys.stderr)
            lm = load(args.model)
            n_layers = layer_count(lm)
        summary = analyze_corpus(
            lm,
            prompts,
            generate=args.generate,
            out=args.out if mirror is not None else out,
            chat=args.chat,
            batch_size=args.batch_size,
            backend=args.backend,
            exact_logits=not args.fused,
            layers=resolve(layers, n_layers),
            keep_qk=resolve(keep_qk, n_layers),
            overwrite=args.overwrite,
            engine=engine,
        )
        report = write_corpus_report(out) if summary.done else None
        if report is not None and mirror is not None:
            mirror.push_file(report.name)
    resumed = f" ({len(summary.resumed)} from an earlier run)" if summary.resumed else ""
    print(f"{len(summary.done)} prompts done{resumed}, {len(summary.skipped)} skipped")
    if summary.seconds:
        print(
            f"{summary.tokens} tokens in {summary.seconds:.1f} s "
            f"({summary.tokens / summary.seconds:.0f} tokens/s, model loading excluded)"
        )
    if summary.nodes:
        nodes = ", ".join(f"{node} ({n} prompts)" for node, n in sorted(summary.nodes.items()))
        print(f"Ray nodes: {nodes}")
    for pid, error in summary.skipped.items():
        print(f"  skipped {pid!r}: {error}")
    sql = (
        f"SELECT prompt, avg(waad) AS waad FROM stats WHERE run = {sql_string(out.name)} "
        "GROUP BY prompt ORDER BY prompt"
    )
    print(f"results: {out} (corpus.json, one run per prompt in prompts/<id>/)")
    if mirror is not None:
        print(f"copied to: {mirror.uri} (the directory above is its local staging copy)")
    if report is not None:
        print(f"report:  {report}")
    print(f"query:   attnscope query {_shell_quote(str(out.parent))} {_shell_quote(sql)}")
    return 0


def _shell_quote(text: str) -> str:
    """``text`` as one shell word: in double quotes when that is safe (readable SQL)."""
    if any(c in text for c in '"$`\\!'):
        return shlex.quote(text)
    return f'"{text}"'
