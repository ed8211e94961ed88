"""Lookback-ratio features (Chuang et al. 2024, Lookback Lens) for a hallucination detector.

For a (context, response) pair read under teacher forcing, the lookback ratio of every head at
every response token (the ``lookback`` row metric, METRICS.md) and, per example, its mean over the
response: the ``[L * H]`` feature vector a linear detector is trained on.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from attnscope.errors import AttnscopeError
from attnscope.kernels.table import CONTEXT_SPAN
from attnscope.models.loaded import LoadedModel
from attnscope.probes.capture import capture


@torch.no_grad()
def lookback_ratios(lm: LoadedModel, context: str, response: str) -> Tensor:
    """Lookback ratio ``[R, L, H]`` of each response token (R tokens) and decoder head."""
    if lm.kind != "causal-lm":
        raise AttnscopeError(f"lookback ratios need a causal LM; {lm.name!r} is a {lm.kind}")
    ctx = lm.tokenizer(context, return_tensors="pt").input_ids  # [1, N], BOS included
    resp = lm.tokenizer(response, add_special_tokens=False, return_tensors="pt").input_ids
    if ctx.shape[1] == 0 or resp.shape[1] == 0:
        raise AttnscopeError("lookback ratios need a non-empty context and response")
    n = ctx.shape[1]
    ids = torch.cat([ctx, resp], 1).to(lm.model.device)
    with capture(lm.model, metrics=("lookback",), spans={CONTEXT_SPAN: (0, n)}) as cap:
        lm.model(input_ids=ids, logits_to_keep=1)
    return cap.trace.rows["lookback"][..., n:].permute(2, 0, 1)


def lookback_features(lm: LoadedModel, examples: Iterable[tuple[str, str]]) -> Tensor:
    """The per-head feature matrix ``[N, L * H]`` (layer-major) of ``N`` (context, response)
    pairs: each head's lookback ratio averaged over the response tokens."""
    rows = [lookback_ratios(lm, c, r).mean(0).reshape(-1) for c, r in examples]
    if not rows:
        raise AttnscopeError("lookback_features needs at least one (context, response) pair")
    return torch.stack(rows)
