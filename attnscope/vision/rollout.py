"""Attention rollout of a captured run, each layer's attention rebuilt from its kept queries and
keys (``keep_qk``) with the attention parameters stored beside them. Works for any self-attention
stack: a ViT's bidirectional layers, a text model's causal or windowed ones."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnscope.errors import AttnscopeError
from attnscope.kernels.tiles import attention_tile
from attnscope.metrics.rollout import RESIDUAL, rollout_rows
from attnscope.trace import Trace


def layer_attention(trace: Trace, layer: int) -> Tensor:
    """Head-averaged attention ``[T, T]`` of one self-attention layer, from kept queries/keys."""
    q, k, attention = trace.layer_qk(layer)  # [Hq, T, D], [Hkv, Tk, D]
    if k.shape[1] != q.shape[1]:
        raise AttnscopeError(
            f"layer {layer} attends to {k.shape[1]} keys from {q.shape[1]} queries: rollout "
            "follows self-attention only (not cross-attention)"
        )
    span = (0, q.shape[1])
    return torch.stack(
        [
            attention_tile(
                q,
                k,
                h,
                span,
                span,
                scale=attention["scale"],
                causal=attention["causal"],
                sliding_window=attention["sliding_window"],
                softcap=attention["softcap"],
            )
            for h in range(q.shape[0])
        ]
    ).mean(0)


def trace_rollout(
    trace: Trace,
    rows: Sequence[int] | None = None,
    layers: tuple[int, int] | None = None,
    residual: float = RESIDUAL,
) -> Tensor:
    """Rollout of ``trace`` over layers ``[start, end)`` (default: every captured layer; each must
    keep its queries/keys) for output ``rows`` (default all; negative counts from the end).
    Returns ``[len(rows), T]`` float64: row i says how much each input position of layer
    ``start`` flows into position ``rows[i]`` after layer ``end - 1``."""
    chosen = [layer for layer in trace.layers if layers is None or layers[0] <= layer < layers[1]]
    if not chosen or (layers is not None and len(chosen) != layers[1] - layers[0]):
        raise AttnscopeError(
            f"rollout over layers {layers} needs all of them captured; captured: {trace.layers}"
        )
    if chosen != list(range(chosen[0], chosen[-1] + 1)):
        raise AttnscopeError(f"rollout needs consecutive layers; captured: {chosen}")
    picked = None if rows is None else [r % len(trace) for r in rows]
    return rollout_rows(lambda layer: layer_attention(trace, layer), chosen, picked, residual)
