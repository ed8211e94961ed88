"""``analyze_corpus(lm, prompts)``: many prompts, batched and resumable, stored as one run.

Layout of a corpus run ``out/``: ``corpus.json`` (model, parameters, prompt ids in order, failed
prompts with their error) and one Trace run per finished prompt in ``prompts/<id>/``. A prompt is
done iff its directory exists (``Trace.save`` renames a complete temporary directory into place),
so an interrupted run loses at most the batch in flight and resumes by running it again.

Statistics are exact per prompt: generation runs batched without capture (finished sequences keep
producing pad tokens that would attend), then each batch's final sequences (prompt + response up
to and including the first end-of-sequence token) go through one left-padded forward pass under
``Capture``, which drops the padding of every sequence.

``out`` may also be a filesystem URI (object storage, a shared filesystem): the run is staged in
a local directory and copied there prompt by prompt (``attnscope.mirror``).

Engines: ``"local"`` analyses in this process (``analyze_in_batches``); ``attnscope.scale``
runs the same function in Ray actors. Either way this process is the only writer of ``out``: it
stores each prompt it receives unless it is stored already (a retried task's second copy).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from attnscope.analyze import chat_text, check_context, check_text, check_unicode, label_run
from attnscope.atomic import (
    check_target,
    claim,
    run_kind,
    sweep,
    write_dir_atomically,
    write_file_atomically,
)
from attnscope.errors import AttnscopeError, RunExistsError
from attnscope.generation import (
    cut_at_eos,
    eos_ids,
    greedy_generate,
    left_pad,
    pad_token_id,
    padded_positions,
)
from attnscope.kernels.config import RESPONSE, StatsConfig
from attnscope.mirror import RunMirror, is_uri
from attnscope.models.loaded import LoadedModel
from attnscope.models.loader import input_device, load
from attnscope.probes.capture import Capture, check_layers
from attnscope.runfiles import CORPUS_FILE, CORPUS_FORMAT, CORPUS_VERSION, PROMPTS_DIR
from attnscope.store.runs import id_problem
from attnscope.trace import TRACE_FILE, Trace

if TYPE_CHECKING:
    from attnscope.scale import RayEngine

PromptSpec = str | tuple[str, str] | Mapping[str, Any]
# parameters that corpus.json records only when they differ from these defaults: corpus runs
# written before the option (or that recorded its default) stay resumable
OPTIONAL_PARAMETERS: dict[str, Any] = {"chat": False, "exact_logits": True}


@dataclass
class CorpusSummary:
    """What a corpus run holds after ``analyze_corpus``."""

    path: Path
    done: list[str]  # ids of the stored prompts, in corpus order (earlier calls included)
    skipped: dict[str, str]  # id -> error text of the prompts that failed in this call
    resumed: list[str] = field(default_factory=list)  # ids already stored before this call
    tokens: int = 0  # tokens of the prompts stored in this call (prompt + response)
    seconds: float = 0.0  # from the start of the first batch to the last store (no model load)
    nodes: dict[str, int] = field(default_factory=dict)  # Ray node id -> prompts stored from it


class Storable(Protocol):
    """A prompt's result: a Trace, or the files of its run (``attnscope.scale.rows.RunFiles``)."""

    def save(self, path: Path) -> Path: ...

    def __len__(self) -> int: ...  # tokens


@dataclass
class BatchResult:
    """What an engine hands back for one batch: each prompt's result or error text, when the
    batch started (``time.time()``) and the Ray node that ran it (None: this process)."""

    outcomes: list[tuple[str, Storable | str]]
    started: float
    node: str | None = None


@dataclass
class _Prompt:
    id: str
    text: str
    ids: Tensor  # [T0] token ids


def analyze_corpus(
    lm: LoadedModel | str,
    prompts: Sequence[PromptSpec],
    generate: int = 0,
    *,
    out: str | Path,
    chat: bool = False,
    batch_size: int = 8,
    config: StatsConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    engine: Literal["local", "ray"] | RayEngine = "local",
    **stats: Any,
) -> CorpusSummary:
    """Analyze every prompt as ``analyze(lm, text, generate)`` would, in batches of ``batch_size``
    (prompts sorted by length), into the corpus run ``out`` (see the module docstring).

    ``prompts``: texts (id = index), ``(id, text)`` pairs or ``{"prompt": ..., "id": ...}`` dicts.
    ``config`` (``StatsConfig``; keyword ``stats`` override its fields) says what to compute.
    ``chat``: each prompt is one user turn under the tokenizer's chat template (as in
    ``analyze``; local engine only). ``exact_logits=False`` (a ``stats`` field, either engine):
    each batch's captured forward runs the fused forward (``kernels.fused``), as in ``analyze``.
    ``lm`` may be a model name, then loaded only once ``out`` is known to be usable. An existing
    ``out`` of the same model, parameters and prompts is resumed; one that differs is refused
    unless ``overwrite``. A prompt that fails (too long for the context, an exception in its
    batch) is reported on stderr, recorded in ``corpus.json`` and skipped; a later call retries it.
    ``fai_rows="response"`` batches only prompts of equal token length together (the FAI rows
    of a batch are shared). Causal language models only (padding is dropped for causal attention).
    ``engine``: ``"local"`` (this process), or ``"ray"`` / an ``attnscope.scale.RayEngine``
    (Ray Data actors that load the model by name: a LoadedModel is reloaded by its name).
    """
    if generate < 0:
        raise ValueError(f"generate must be >= 0, got {generate}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    engine = _engine(engine)
    if chat and engine != "local":
        raise AttnscopeError(
            "chat templates are applied by the local engine only: use engine='local' "
            "(CLI: --engine local) with chat=True (--chat)"
        )
    config = StatsConfig.build(config, **stats)  # checks metrics, backend and window once
    entries = prompt_list(prompts)
    mirror = RunMirror.of(str(out)) if is_uri(out) else None
    if mirror is not None:  # staged here, copied to the URI prompt by prompt
        mirror.pull()
    out = Path(out) if mirror is None else mirror.staging
    manifest = {
        "format": CORPUS_FORMAT,
        "format_version": CORPUS_VERSION,
        "model": lm if isinstance(lm, str) else lm.name,
        "parameters": {
            key: value
            for key, value in {"generate": generate, **config.to_json(), "chat": chat}.items()
            if key not in OPTIONAL_PARAMETERS or value != OPTIONAL_PARAMETERS[key]
        },
        "prompts_sha256": hashlib.sha256(json.dumps(entries).encode()).hexdigest(),
        "prompts": [pid for pid, _ in entries],
        "failed": {},
    }
    with claim(out, "corpus run"):  # one writer per corpus run
        resume = _check_out(out, manifest, overwrite)
        prompts_dir = out / PROMPTS_DIR
        resumed = [
            pid for pid, _ in entries if resume and (prompts_dir / pid / TRACE_FILE).is_file()
        ]
        stored = set(resumed)
        todo = [(pid, text) for pid, text in entries if pid not in stored]
        if engine == "local":
            if isinstance(lm, str):
                if progress:
                    print(f"loading {lm} ...", file=sys.stderr)
                lm = load(lm)
            check_model(lm, config)
        with tqdm(desc="analyzing", disable=not progress) as bar:
            if engine == "local":
                results = analyze_in_batches(lm, todo, generate, config, batch_size, bar, chat=chat)
            else:
                from attnscope.scale import ray_batches

                model = manifest["model"]
                results = ray_batches(engine, model, todo, generate, config, batch_size, bar)
            summary = _store(out, manifest, resume, overwrite, results, bar, mirror)
        summary.done = [pid for pid, _ in entries if (prompts_dir / pid / TRACE_FILE).is_file()]
        summary.resumed = resumed
        return summary


def check_model(lm: LoadedModel, config: StatsConfig) -> None:
    """Refuse a model the corpus engines cannot analyse, or ``config`` layers it lacks (at once,
    not prompt by prompt)."""
    if lm.kind != "causal-lm":
        raise AttnscopeError(
            f"analyze_corpus() takes causal language models; {lm.name!r} is a {lm.kind} model "
            "(use analyze() per text)"
        )
    check_layers(lm.model, config)


def analyze_in_batches(
    lm: LoadedModel,
    entries: list[tuple[str, str]],
    generate: int,
    config: StatsConfig,
    batch_size: int,
    bar: tqdm,
    *,
    chat: bool = False,
) -> Iterator[BatchResult]:
    """The engine of one process: the ``(id, text)`` prompts tokenized (``chat``: as user turns
    under the chat template), those too long for the context failed at once (one result), the
    rest in batches of ``batch_size`` sorted by token count, each batch's traces or the error
    that ended it. ``bar`` counts tokens."""
    todo: list[_Prompt] = []
    too_long: list[tuple[str, Storable | str]] = []
    if chat:
        entries = [(pid, chat_text(lm, text)) for pid, text in entries]
    for pid, text in entries:
        # [T0]; a chat template writes its own special tokens
        ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=not chat).input_ids[0]
        try:
            check_context(lm, len(ids) + generate)
        except AttnscopeError as err:
            too_long.append((pid, str(err)))
            continue
        todo.append(_Prompt(pid, text, ids))
    if too_long:
        yield BatchResult(too_long, time.time())
    bar.unit = "tok"
    bar.reset(total=sum(len(p.ids) for p in todo) + generate * len(todo))
    for batch in _batches(todo, batch_size, same_length=config.fai_rows == RESPONSE):
        before, started = bar.n, time.time()
        outcomes: list[tuple[str, Storable | str]]
        try:
            traces = _analyze_batch(lm, batch, generate, config, bar)
            outcomes = [(p.id, t) for p, t in zip(batch, traces, strict=True)]
        except Exception as err:  # reported and skipped: one bad batch must not end the run
            outcomes = [(p.id, f"{type(err).__name__}: {err}") for p in batch]
        # generation may stop early (end of sequence) or fail: keep the total reachable
        bar.total -= sum(len(p.ids) + generate for p in batch) - (bar.n - before)
        yield BatchResult(outcomes, started)


def read_prompts(file: str | Path) -> list[tuple[str, str]]:
    """``(id, text)`` pairs from a JSONL file of ``{"prompt": "...", "id": "..."}`` objects (blank
    lines skipped; the id defaults to the 0-based line number). Errors name the line."""
    file = Path(file)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise AttnscopeError(f"cannot read the prompts file {file}: {err}") from err
    entries = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{file} line {n + 1}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise AttnscopeError(f"{where}: not valid JSON ({err.msg})") from err
        entries.append(_entry(where, str(n), obj))
    return _validated(entries)


def prompt_list(prompts: Sequence[PromptSpec]) -> list[tuple[str, str]]:
    """``(id, text)`` pairs from texts (id = index), pairs or dicts, with checked ids."""
    if isinstance(prompts, str | Mapping):
        raise AttnscopeError("prompts must be a list (of texts, (id, text) pairs or dicts)")
    entries = []
    for i, p in enumerate(prompts):
        where = f"prompt {i}"
        if isinstance(p, str):
            entries.append((where, str(i), p))
        elif isinstance(p, tuple) and len(p) == 2:
            entries.append((where, *p))
        else:
            entries.append(_entry(where, str(i), p))
    if not entries:
        raise AttnscopeError("no prompts given")
    return _validated(entries)


def _entry(where: str, default_id: str, obj: Any) -> tuple[str, Any, Any]:
    if not isinstance(obj, Mapping):
        raise AttnscopeError(
            f'{where}: expected an object like {{"prompt": "...", "id": "..."}}, '
            f"got {type(obj).__name__}"
        )
    return where, obj.get("id", default_id), obj.get("prompt")


def _validated(entries: list[tuple[str, Any, Any]]) -> list[tuple[str, str]]:
    """Check texts and ids (strings usable as directory names, unique); ``(id, text)`` pairs."""
    first: dict[str, str] = {}
    for where, pid, text in entries:
        check_text(text, f'{where}: "prompt"')
        if not isinstance(pid, str):
            raise AttnscopeError(f"{where}: the id must be a string, got {pid!r}")
        check_unicode(pid, f"{where}: the id")
        problem = id_problem(pid)
        if problem:
            raise AttnscopeError(
                f"{where}: id {pid!r} {problem}; ids name directories: non-empty, no '/', '\\' "
                "or control characters, not starting with '.'"
            )
        if pid in first:
            raise AttnscopeError(f"{where}: id {pid!r} is already used by {first[pid]}")
        first[pid] = where
    return [(pid, text) for _, pid, text in entries]


def _check_out(out: Path, manifest: dict, overwrite: bool) -> bool:
    """Whether ``out`` holds this corpus run to resume (False: a new one is made); refuses an
    ``out`` that holds something else, unless ``overwrite`` and it is an attnscope run
    (``attnscope.atomic.check_target``), and a corpus run of a newer attnscope."""
    kind = run_kind(out)
    if overwrite or kind != "corpus":
        if not overwrite and out.is_dir() and any(out.iterdir()):
            raise RunExistsError(
                f"{out} exists and is not a corpus run; choose another out directory"
                + (" or pass overwrite=True (CLI: --overwrite) to replace it" if kind else "")
            )
        check_target(out, overwrite)
        return False
    old = json.loads((out / CORPUS_FILE).read_text())  # run_kind has read it
    version = old.get("format_version")
    if not isinstance(version, int) or version > CORPUS_VERSION:
        raise AttnscopeError(
            f"{out} holds a corpus run of format version {version!r}, which this attnscope "
            f"(version {CORPUS_VERSION}) cannot resume: upgrade attnscope, or choose another out "
            "directory"
        )
    old_params, new_params = (
        {**OPTIONAL_PARAMETERS, **params}
        for params in (old.get("parameters") or {}, manifest["parameters"])
    )
    differences = [
        f"{key}={old_params.get(key)!r} (now {new_params.get(key)!r})"
        for key in dict.fromkeys([*old_params, *new_params])
        if old_params.get(key) != new_params.get(key)
    ]
    if old.get("model") != manifest["model"]:
        differences.insert(0, f"model {old.get('model')!r} (now {manifest['model']!r})")
    if old.get("prompts_sha256") != manifest["prompts_sha256"]:
        differences.append("the prompts (ids or texts)")
    if differences:
        raise RunExistsError(
            f"{out} holds a corpus run that differs: {'; '.join(differences)}. Resume it with the "
            "same model, parameters and prompts, or pass overwrite=True (CLI: --overwrite)"
        )
    return True


def _open_out(out: Path, resume: bool, manifest: dict, overwrite: bool) -> None:
    """Clear what an interrupted run left half-written in ``out``, or make it a new corpus run
    (``corpus.json`` and an empty ``prompts/``) in one atomic write."""
    if resume:
        sweep(out)
        sweep(out / PROMPTS_DIR)
        return

    def fill(tmp: Path) -> None:
        (tmp / PROMPTS_DIR).mkdir()
        (tmp / CORPUS_FILE).write_text(json.dumps(manifest, indent=1))

    write_dir_atomically(out, fill, overwrite=overwrite)


def _engine(engine: str | RayEngine) -> Literal["local"] | RayEngine:
    if engine == "local":
        return "local"
    from attnscope.scale import RayEngine

    if engine == "ray":
        return RayEngine()
    if not isinstance(engine, RayEngine):
        raise ValueError(f"engine must be 'local', 'ray' or a RayEngine, got {engine!r}")
    return engine


def _store(
    out: Path,
    manifest: dict,
    resume: bool,
    overwrite: bool,
    results: Iterator[BatchResult],
    bar: tqdm,
    mirror: RunMirror | None = None,
) -> CorpusSummary:
    """Store each prompt of ``results`` atomically unless it is stored already, record the
    failures in ``corpus.json``. ``out`` is opened (``_open_out``) with the first result, so an
    engine that fails before any (a model that does not load) leaves no run behind. ``mirror``
    copies each stored prompt and manifest to its URI."""

    def write_manifest() -> None:
        write_file_atomically(out / CORPUS_FILE, json.dumps(manifest, indent=1))
        if mirror is not None:
            mirror.push_file(CORPUS_FILE)

    prompts_dir = out / PROMPTS_DIR
    failed: dict[str, str] = manifest["failed"]
    tokens, first = 0, float("inf")
    nodes: Counter[str] = Counter()

    def open_once() -> None:
        if first == float("inf"):  # no result yet, so out is not open yet
            _open_out(out, resume, manifest, overwrite)
            write_manifest()

    for result in results:
        open_once()
        first = min(first, result.started)
        errors: dict[str, str] = {}
        for pid, outcome in result.outcomes:
            if (prompts_dir / pid / TRACE_FILE).is_file():
                continue  # a retried task's second copy
            if isinstance(outcome, str):
                errors[pid] = outcome
                continue
            try:
                outcome.save(prompts_dir / pid)
                if mirror is not None:
                    mirror.push_prompt(pid)
            except Exception as err:  # reported and skipped, like a failed batch
                errors[pid] = f"{type(err).__name__}: {err}"
                continue
            failed.pop(pid, None)
            tokens += len(outcome)
            if result.node is not None:
                nodes[result.node] += 1
        if errors:
            _fail(failed, errors)
            write_manifest()
        seconds = max(time.time() - first, 1e-9)
        bar.set_postfix({"skipped": len(failed), "tok/s": f"{tokens / seconds:.0f}"})
    open_once()
    seconds = time.time() - first if first < float("inf") else 0.0
    return CorpusSummary(out, [], dict(failed), tokens=tokens, seconds=seconds, nodes=dict(nodes))


def _fail(failed: dict[str, str], errors: dict[str, str]) -> None:
    for pid, error in errors.items():
        failed[pid] = error
        tqdm.write(f"attnscope: skipped prompt {pid!r}: {error}", file=sys.stderr)


def _batches(prompts: list[_Prompt], size: int, same_length: bool) -> list[list[_Prompt]]:
    """Prompts sorted by token count (ties in corpus order), in batches of at most ``size``;
    with ``same_length`` a batch holds prompts of one length only."""
    batches: list[list[_Prompt]] = []
    for p in sorted(prompts, key=lambda p: len(p.ids)):
        last = batches[-1] if batches else None
        if last and len(last) < size and (not same_length or len(last[0].ids) == len(p.ids)):
            last.append(p)
        else:
            batches.append([p])
    return batches


def _analyze_batch(
    lm: LoadedModel, batch: list[_Prompt], generate: int, config: StatsConfig, bar: tqdm
) -> list[Trace]:
    """Generate for a batch, then capture one padded forward pass of its final sequences; one
    labelled Trace per prompt (padding dropped)."""
    model, tok = lm.model, lm.tokenizer
    start = time.perf_counter()
    seqs = [p.ids for p in batch]
    if generate:
        seqs = _generated(lm, seqs, generate, bar)
    ids, mask = left_pad(seqs, pad_token_id(model, tok), input_device(model))  # [B, T]
    n_prompt = len(batch[0].ids)
    # fai_rows="response": the batch's prompts share one length
    cap = Capture(model, config=config.resolved(n_prompt, n_prompt + generate), tokenizer=tok)
    with torch.no_grad(), cap:
        model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=padded_positions(mask),
            logits_to_keep=1,
            use_cache=False,  # one forward: a KV cache would only hold memory
        )
    bar.update(sum(len(p.ids) for p in batch))
    traces = cap.traces()
    for prompt, trace in zip(batch, traces, strict=True):
        label_run(trace, lm, len(prompt.ids), prompt.text, start).meta["prompt_id"] = prompt.id
    return traces


def _generated(lm: LoadedModel, prompts: list[Tensor], generate: int, bar: tqdm) -> list[Tensor]:
    """Each prompt ``[T0_i]`` followed by its greedy response up to and including the first
    end-of-sequence token (batched generation, left padding)."""
    model, tok = lm.model, lm.tokenizer
    ids, mask = left_pad(prompts, pad_token_id(model, tok), input_device(model))  # [B, T0]
    out = greedy_generate(model, tok, ids, mask, generate, bar)
    new = out.sequences[:, ids.shape[1] :].cpu()  # [B, generated]
    eos = eos_ids(model, tok)
    return [torch.cat([p, cut_at_eos(r, eos)]) for p, r in zip(prompts, new, strict=True)]
