"""``analyze(lm, text)``: run a model on a text (optionally generating), capture, return a Trace."""

from __future__ import annotations

import re
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from attnscope.errors import AttnscopeError
from attnscope.generation import greedy_generate
from attnscope.kernels.config import StatsConfig
from attnscope.models.loaded import LoadedModel
from attnscope.models.loader import input_device
from attnscope.probes.capture import Capture
from attnscope.probes.session import layer_progress
from attnscope.trace import QK_DISK_DTYPE, Trace

_SURROGATE = re.compile(r"[\ud800-\udfff]")
LONG_INPUT = 2048  # tokens from which a forward shows a progress bar per attention layer
QK_BUDGET = 64 * 2**20  # bytes of float16 queries/keys a single run keeps by default


def analyze(
    lm: LoadedModel,
    text: str,
    generate: int = 0,
    *,
    chat: bool = False,
    config: StatsConfig | None = None,
    progress: bool = True,
    **stats: Any,
) -> Trace:
    """Run ``lm`` on ``text`` (greedily generating ``generate`` tokens) and return its Trace.

    ``config`` (``StatsConfig``) says what to compute; keyword ``stats`` override its fields
    (``metrics``, ``layers``, ``backend``, ``window``, ``fai_horizon``, ``fai_rows``,
    ``sink_tokens``, ``spans``, ``keep_qk``). ``trace.spans`` holds ``prompt`` and, when
    generating, ``response``. ``chat``: ``text`` is one user turn, run under the tokenizer's chat
    template with the assistant's turn opened (``chat_text``); the ``prompt`` span and
    ``meta["text"]`` are then the templated prompt. ``fai_rows="response"`` restricts FAI to
    response rows, as in reasoning-trace analyses. ``keep_qk`` keeps the post-RoPE queries and keys of those layers
    (True: all) for attention rows and heatmaps on demand; by default every layer's while they
    fit ``QK_BUDGET`` as float16, else none (``meta["qk_note"]`` says how to keep some).
    """
    check_text(text)
    budget_qk = config is None and "keep_qk" not in stats
    config = StatsConfig.build(config, **stats)
    if lm.kind not in ("causal-lm", "encoder"):
        raise AttnscopeError(
            f"analyze() takes text models; {lm.name!r} is a {lm.kind} model "
            "(speech and VLM analyses have their own commands)"
        )
    if lm.tokenizer is None:
        raise AttnscopeError(
            f"{lm.name!r} reads images, not text: analyse an image with "
            "asc.analyze_vit(image, model=...) (CLI: attnscope vit IMAGE)"
        )
    if generate < 0:
        raise ValueError(f"generate must be >= 0, got {generate}")
    if generate and lm.kind != "causal-lm":
        raise AttnscopeError(f"{lm.name!r} is an encoder: it cannot generate (use generate=0)")
    model, tok = lm.model, lm.tokenizer
    if chat:
        text = chat_text(lm, text)
    # a chat template writes its own special tokens
    ids = tok(text, return_tensors="pt", add_special_tokens=not chat).input_ids  # [1, T0]
    ids = ids.to(input_device(model))
    n_prompt = ids.shape[1]
    if n_prompt == 0:
        raise AttnscopeError(
            f"the prompt {text[:40]!r} gives no token with the tokenizer of {lm.name!r}; "
            "give text that has at least one token"
        )
    check_context(lm, n_prompt + generate)
    _check_spans(config, n_prompt + generate)
    qk_note = ""
    if budget_qk:
        keep_qk, qk_note = qk_within_budget(model.config, n_prompt + generate, config.layers)
        config = config.replace(keep_qk=keep_qk)
    cap = Capture(model, config=config.resolved(n_prompt, n_prompt + generate), tokenizer=tok)
    start = time.perf_counter()
    with torch.no_grad(), cap:
        if generate:
            _generate(model, tok, ids, generate, progress)
        else:  # long forwards show their progress layer by layer
            with layer_progress(model, disable=not progress or n_prompt < LONG_INPUT):
                if lm.kind == "causal-lm":  # no KV cache: 1.2 GB of keys and values at 32K
                    model(input_ids=ids, logits_to_keep=1, use_cache=False)
                else:
                    model(input_ids=ids)
    trace = label_run(cap.trace, lm, n_prompt, text, start)
    trace.meta["chat"] = chat
    if qk_note:
        trace.meta["qk_note"] = qk_note
    return trace


def qk_within_budget(
    model_config: Any, n_tokens: int, layers: tuple[int, ...] | None, budget: int = QK_BUDGET
) -> tuple[bool, str]:
    """Whether a single run keeps the queries/keys of every captured layer by default: when they
    fit ``budget`` bytes as float16; else False and a note saying how to keep some."""
    text = model_config.get_text_config()
    n_q = text.num_attention_heads
    n_kv = getattr(text, "num_key_value_heads", None) or n_q
    dim = getattr(text, "head_dim", None) or text.hidden_size // n_q
    n_layers = len(layers) if layers is not None else text.num_hidden_layers
    need = n_layers * n_tokens * (n_q + n_kv) * dim * QK_DISK_DTYPE.itemsize
    if need <= budget:
        return True, ""
    return False, (
        f"queries/keys not kept: all {n_layers} layers need {need / 2**20:.0f} MB for "
        f"{n_tokens} tokens, over the {budget // 2**20} MB default; keep some layers with "
        "--keep-qk 0,6,11 (keep_qk=[0, 6, 11]) or all with --keep-qk all"
    )


def chat_text(lm: LoadedModel, text: str) -> str:
    """``text`` as one user turn under the tokenizer's chat template, the assistant's turn opened
    (tokenize it with ``add_special_tokens=False``)."""
    template = getattr(lm.tokenizer, "chat_template", None)
    if lm.kind != "causal-lm" or not template:
        raise AttnscopeError(
            f"{lm.name!r} has no chat template in its tokenizer: analyse the text as it is "
            "(without chat=True / --chat), or use an instruct model such as smollm2-135m-instruct"
        )
    messages = [{"role": "user", "content": text}]
    return lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def check_text(text: Any, what: str = "the prompt") -> None:
    """Refuse what no tokenizer takes: a non-string, an empty string, text that is not valid
    Unicode (``check_unicode``)."""
    if not isinstance(text, str) or not text:
        raise AttnscopeError(f"{what} must be a non-empty string, got {text!r}")
    check_unicode(text, what)


def check_unicode(text: str, what: str) -> None:
    """Refuse lone surrogates (what Python makes of command-line bytes that are not UTF-8): no
    tokenizer, file or Parquet column takes them."""
    bad = _SURROGATE.search(text)
    if bad:
        code = ord(bad.group())
        byte = f" (the byte 0x{code - 0xDC00:02X}, not UTF-8)" if 0xDC80 <= code <= 0xDCFF else ""
        raise AttnscopeError(
            f"{what} is not valid Unicode: character {bad.start()} is the lone surrogate "
            f"U+{code:04X}{byte}; give UTF-8 text (on a command line: a UTF-8 locale and bytes)"
        )


def _check_spans(config: StatsConfig, n_tokens: int) -> None:
    """Spans are token positions ``[start, end)`` of the run: within ``0..n_tokens``."""
    for name, (start, end) in config.spans:
        if start < 0 or end > n_tokens:
            raise AttnscopeError(
                f"span {name!r} = [{start}, {end}) is outside the run's {n_tokens} tokens "
                f"(prompt + generation): give positions from 0 to {n_tokens}"
            )


def label_run(trace: Trace, lm: LoadedModel, n_prompt: int, text: str, start: float) -> Trace:
    """Add the ``prompt`` / ``response`` spans and the run's metadata (model, texts, seconds
    since ``start``) to a freshly captured trace."""
    n = len(trace)
    trace.spans = {
        "prompt": (0, n_prompt),
        **({"response": (n_prompt, n)} if n > n_prompt else {}),
        **trace.spans,
    }
    trace.meta.update(
        model=lm.name,
        source=lm.source,
        kind=lm.kind,
        text=text,
        generated_text=lm.tokenizer.decode(trace.token_ids[n_prompt:]) if n > n_prompt else "",
        seconds=round(time.perf_counter() - start, 3),
    )
    return trace


def _generate(model: Any, tok: Any, ids: torch.Tensor, n_new: int, progress: bool) -> None:
    """Greedy generation, then one cached step on the last token so every token gets a row."""
    with tqdm(total=n_new, desc="generating", unit="tok", disable=not progress) as bar:
        out = greedy_generate(model, tok, ids, torch.ones_like(ids), n_new, bar)
    seq = out.sequences  # [1, T0 + generated]
    if seq.shape[1] > ids.shape[1]:
        model(input_ids=seq[:, -1:], past_key_values=out.past_key_values, logits_to_keep=1)


def check_context(lm: LoadedModel, n_tokens: int) -> None:
    config = lm.model.config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and n_tokens > limit:
        raise AttnscopeError(
            f"prompt + generation is {n_tokens} tokens, longer than the context of {lm.name!r} "
            f"({limit} tokens); shorten the prompt or generate fewer tokens"
        )
