"""``analyze(lm, text)``: run a model on a text (optionally generating), capture, return a Trace."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from attnscope.errors import AttnscopeError
from attnscope.metrics.dense import FAI_HORIZON, WAAD_WINDOW
from attnscope.models.loaded import LoadedModel
from attnscope.probes.capture import Capture
from attnscope.trace import Trace


class ProgressTick(StoppingCriteria):
    """Advances a progress bar by one token per sequence per generation step; never stops
    generation."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.bar.update(input_ids.shape[0])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def analyze(
    lm: LoadedModel,
    text: str,
    generate: int = 0,
    *,
    metrics: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    backend: str = "auto",
    window: int = WAAD_WINDOW,
    fai_horizon: tuple[int, int] | None = FAI_HORIZON,
    fai_rows: tuple[int, int] | str | None = None,
    sink_tokens: int = 1,
    spans: Mapping[str, tuple[int, int]] | None = None,
    keep_qk: Sequence[int] | bool = False,
    progress: bool = True,
) -> Trace:
    """Run ``lm`` on ``text`` (greedily generating ``generate`` tokens) and return its Trace.

    ``trace.spans`` holds ``prompt`` and, when generating, ``response``. ``fai_rows="response"``
    restricts FAI to response rows, as in reasoning-trace analyses. ``keep_qk`` keeps the
    post-RoPE queries and keys of those layers (True: all) for attention heatmaps on demand.
    """
    if lm.kind not in ("causal-lm", "encoder"):
        raise AttnscopeError(
            f"analyze() takes text models; {lm.name!r} is a {lm.kind} model "
            "(speech and VLM analyses have their own commands)"
        )
    if generate < 0:
        raise ValueError(f"generate must be >= 0, got {generate}")
    if generate and lm.kind != "causal-lm":
        raise AttnscopeError(f"{lm.name!r} is an encoder: it cannot generate (use generate=0)")
    model, tok = lm.model, lm.tokenizer
    ids = tok(text, return_tensors="pt").input_ids.to(model.device)  # [1, T0]
    n_prompt = ids.shape[1]
    check_context(lm, n_prompt + generate)
    if fai_rows == "response":
        fai_rows = (n_prompt, n_prompt + generate)
    cap = Capture(
        model,
        metrics,
        layers,
        backend=backend,
        window=window,
        fai_horizon=fai_horizon,
        fai_rows=fai_rows,
        sink_tokens=sink_tokens,
        spans=spans,
        tokenizer=tok,
        keep_qk=keep_qk,
    )
    start = time.perf_counter()
    with torch.no_grad(), cap:
        if generate:
            _generate(model, tok, ids, generate, progress)
        elif lm.kind == "causal-lm":
            model(input_ids=ids, logits_to_keep=1)
        else:
            model(input_ids=ids)
    return label_run(cap.trace, lm, n_prompt, text, start)


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


def greedy_generate(
    model: Any, tok: Any, ids: torch.Tensor, attention_mask: torch.Tensor, n_new: int, bar: tqdm
) -> Any:
    """Greedy generation of up to ``n_new`` tokens after ``ids`` ``[B, T0]`` (left-padded when
    B > 1), ticking ``bar`` per generated token; generate()'s output (``.sequences``
    ``[B, T0 + generated]``, finished sequences continued with the pad token)."""
    return model.generate(
        ids,
        attention_mask=attention_mask,
        max_new_tokens=n_new,
        do_sample=False,
        return_dict_in_generate=True,
        stopping_criteria=StoppingCriteriaList([ProgressTick(bar)]),
        pad_token_id=pad_token_id(tok),
    )


def pad_token_id(tok: Any) -> int | None:
    """The tokenizer's pad token, else its end-of-sequence token."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def check_context(lm: LoadedModel, n_tokens: int) -> None:
    config = lm.model.config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and n_tokens > limit:
        raise AttnscopeError(
            f"prompt + generation is {n_tokens} tokens, longer than the context of {lm.name!r} "
            f"({limit} tokens); shorten the prompt or generate fewer tokens"
        )
