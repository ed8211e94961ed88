"""``analyze_image(lm, image, prompt)``: run a VLM on images + a prompt, capture, return a Trace."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteriaList

from attnscope.analyze import check_context, label_run
from attnscope.generation import ProgressTick, pad_token_id
from attnscope.kernels.config import StatsConfig
from attnscope.models.loaded import LoadedModel
from attnscope.probes.capture import Capture
from attnscope.trace import Trace
from attnscope.vlm.images import ImageSource
from attnscope.vlm.inputs import prepare
from attnscope.vlm.layout import ImageLayout, family_of

VLM_STATS = StatsConfig(keep_qk=True)


class Intervention(Protocol):
    """What ``analyze_image`` needs of an intervention (see ``attnscope.interventions``)."""

    def applied(self, model: torch.nn.Module, layout: ImageLayout) -> Any: ...


def analyze_image(
    lm: LoadedModel,
    images: ImageSource | list[ImageSource],
    prompt: str,
    generate: int = 0,
    *,
    config: StatsConfig = VLM_STATS,
    intervention: Intervention | None = None,
    progress: bool = True,
    **stats: Any,
) -> Trace:
    """Run ``lm`` on ``images`` and ``prompt`` (greedily generating ``generate`` tokens) and
    return the Trace of its language model.

    ``trace.spans`` holds ``prompt``, ``response`` and one ``image:i`` span per image;
    ``trace.meta["images"]`` the patch grid of each (``ImageLayout.of(trace)``). ``config``
    (``StatsConfig``; keyword ``stats`` override its fields) says what to compute; by default it
    keeps the queries and keys that heatmaps and visual entropy are computed from, and adds one
    ``span_mass:image:i`` per image. ``intervention``
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
    config = StatsConfig.build(config, **stats)
    config = config.replace(spans={**config.span_dict, **inputs.layout.spans})
    cap = Capture(
        model, config=config.resolved(n_prompt, n_prompt + generate), tokenizer=lm.tokenizer
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
            pad_token_id=pad_token_id(model, tok),
        )
    seq = out.sequences  # [1, T0 + generated]
    if seq.shape[1] > tensors["input_ids"].shape[1]:
        model(input_ids=seq[:, -1:], past_key_values=out.past_key_values, logits_to_keep=1)
