"""``analyze_image(lm, image, prompt)``: run a VLM on images + a prompt, capture, return a Trace."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteriaList

from attnscope.analyze import ProgressTick, check_context, label_run
from attnscope.models.loaded import LoadedModel
from attnscope.probes.capture import Capture
from attnscope.trace import Trace
from attnscope.vlm.images import ImageSource
from attnscope.vlm.inputs import prepare
from attnscope.vlm.layout import ImageLayout, family_of


class Intervention(Protocol):
    """What ``analyze_image`` needs of an intervention (see ``attnscope.interventions``)."""

    def applied(self, model: torch.nn.Module, layout: ImageLayout) -> Any: ...


def analyze_image(
    lm: LoadedModel,
    images: ImageSource | list[ImageSource],
    prompt: str,
    generate: int = 0,
    *,
    layers: Sequence[int] | None = None,
    keep_qk: Sequence[int] | bool = True,
    intervention: Intervention | None = None,
    backend: str = "auto",
    progress: bool = True,
) -> Trace:
    """Run ``lm`` on ``images`` and ``prompt`` (greedily generating ``generate`` tokens) and
    return the Trace of its language model.

    ``trace.spans`` holds ``prompt``, ``response`` and one ``image:i`` span per image;
    ``trace.meta["images"]`` the patch grid of each (``ImageLayout.of(trace)``). ``keep_qk`` keeps
    the queries and keys that heatmaps and visual entropy are computed from. ``intervention``
    (e.g. ``VisualBoost()``) is applied during the run and its effect captured with it;
    ``meta["intervention"]`` adds the edited rows' mass on the image tokens before and after the
    edit, per layer.
    """
    if generate < 0:
        raise ValueError(f"generate must be >= 0, got {generate}")
    inputs = prepare(lm, images, prompt)
    model, tensors = lm.model, inputs.tensors
    n_prompt = tensors["input_ids"].shape[1]
    check_context(lm, n_prompt + generate)
    cap = Capture(
        model,
        layers=layers,
        backend=backend,
        spans=inputs.layout.spans,
        tokenizer=lm.tokenizer,
        keep_qk=keep_qk,
    )
    session = (
        intervention.applied(model, inputs.layout) if intervention else contextlib.nullcontext()
    )
    start = time.perf_counter()
    with torch.no_grad(), session, cap:
        if generate:
            _generate(model, tensors, generate, lm.tokenizer, progress)
        else:
            model(**tensors, logits_to_keep=1)
    trace = label_run(cap.trace, lm, n_prompt, inputs.prompt, start)
    trace.meta.update(
        images=inputs.layout.to_meta(),
        vision_stack=family_of(model.config).vision_stack,
        visual_entropy="renormalised over the image tokens",
    )
    if intervention is not None:
        trace.meta["intervention"] = session.summary()
    return trace


def _generate(model: Any, tensors: Any, n_new: int, tok: Any, progress: bool) -> None:
    """Greedy generation, then one cached step on the last token so every token gets a row.

    The image token is suppressed: generated, it would claim image features it has none of.
    """
    with tqdm(total=n_new, desc="generating", unit="tok", disable=not progress) as bar:
        out = model.generate(
            **tensors,
            max_new_tokens=n_new,
            do_sample=False,
            return_dict_in_generate=True,
            stopping_criteria=StoppingCriteriaList([ProgressTick(bar)]),
            suppress_tokens=[model.config.image_token_id],
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    seq = out.sequences  # [1, T0 + generated]
    if seq.shape[1] > tensors["input_ids"].shape[1]:
        model(input_ids=seq[:, -1:], past_key_values=out.past_key_values, logits_to_keep=1)
