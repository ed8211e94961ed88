"""Attention rollout (Abnar & Zuidema 2020, METRICS.md): how much each input position contributes
to each position after a range of layers, following attention through the residual stream.

Each layer's head-averaged attention ``A_l`` becomes ``R_l = residual * I + (1 - residual) * A_l``,
each row renormalised to sum 1 (rows of causal or windowed attention already sum to 1; rows with
a learned sink do not), and the rollout after layers ``l0..l1`` is ``R_l1 @ ... @ R_l0``: row ``t``
is a distribution over the inputs of layer ``l0``.

``rollout`` takes the matrices; ``rollout_rows`` asks for one layer's matrix at a time (top layer
first) and keeps only the chosen rows, so a long sequence needs one ``[T, T]`` matrix in memory.
``attnscope.vision.rollout.trace_rollout`` rebuilds the matrices from a trace's kept queries/keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

RESIDUAL = 0.5  # weight of the identity (the residual connection), Abnar & Zuidema's choice


def residual_attention(attention: Tensor, residual: float = RESIDUAL) -> Tensor:
    """``[..., H, T, T]`` (heads averaged) or ``[..., T, T]`` -> row-normalised
    ``residual * I + (1 - residual) * A`` ``[..., T, T]`` (float64)."""
    a = attention.double()
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"rollout needs square self-attention matrices, got {tuple(a.shape)}")
    if not 0 <= residual <= 1:
        raise ValueError(f"residual must be in [0, 1], got {residual}")
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    mixed = residual * eye + (1 - residual) * torch.nan_to_num(a)
    return mixed / mixed.sum(-1, keepdim=True)


def rollout(
    attentions: Tensor, rows: Sequence[int] | None = None, residual: float = RESIDUAL
) -> Tensor:
    """Rollout through all layers of ``attentions`` ``[L, H, T, T]`` (heads averaged here) or
    ``[L, T, T]`` (already averaged), lowest layer first. Returns ``[T, T]``, or ``[len(rows), T]``
    for the output ``rows`` only; float64, rows sum to 1."""
    if attentions.dim() == 4:
        attentions = attentions.double().mean(1)
    if attentions.dim() != 3:
        raise ValueError(f"attentions must be [L, H, T, T] or [L, T, T], got {attentions.dim()}-D")
    return rollout_rows(lambda i: attentions[i], range(len(attentions)), rows, residual)


def rollout_rows(
    attention_of: Callable[[int], Tensor],
    layers: Sequence[int],
    rows: Sequence[int] | None = None,
    residual: float = RESIDUAL,
) -> Tensor:
    """Rollout through ``layers`` (lowest first), where ``attention_of(layer)`` returns that layer's
    attention ``[T, T]`` (or ``[H, T, T]``: heads averaged). Matrices are asked for from the top
    layer down, one at a time. Returns ``[len(rows), T]`` (all rows if None), float64."""
    if not layers:
        raise ValueError("rollout needs at least one layer")
    out = None
    for layer in reversed(list(layers)):
        a = attention_of(layer)
        a = a.double().mean(0) if a.dim() == 3 else a
        r = residual_attention(a, residual)  # [T, T]
        if out is None:
            out = r if rows is None else r[torch.as_tensor(list(rows), dtype=torch.long)]
        else:
            out = out @ r
    return out
