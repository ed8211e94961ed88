"""Visual statistics of a trace analysed with ``analyze_image`` (METRICS.md, vision-language models).

- visual_mass: attention mass on all image tokens (sum of the image spans' span_mass), per row;
- visual_entropy: entropy of the attention restricted to the image tokens and renormalised over
  them, at one query row (default: the last), per layer and head; METRICS.md's layer-range value
  is the mean over the chosen layers;
- visual_sinks: image tokens whose sink_score is far above the mean sink_score of their image.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnscope.errors import AttnscopeError
from attnscope.kernels import attention_stats
from attnscope.kernels.request import SPAN_PREFIX
from attnscope.trace import Trace
from attnscope.vlm.layout import ImageLayout

SINK_FACTOR = 5.0


def visual_mass(trace: Trace) -> Tensor:
    """Attention mass of every row on all image tokens. ``[n_layers, n_heads, T]``."""
    layout = ImageLayout.of(trace)
    return torch.stack([trace.rows[SPAN_PREFIX + s.name] for s in layout.images]).sum(0)


def visual_entropy(trace: Trace, position: int = -1) -> Tensor:
    """Entropy (nats) of query ``position``'s attention over the image tokens it sees,
    renormalised to sum to 1 over them. Needs the queries and keys kept by ``analyze_image``.
    ``[n_layers, n_heads]`` in ``trace.layers`` order."""
    position = position % len(trace)
    keys = ImageLayout.of(trace).positions
    keys = keys[keys <= position]
    if keys.numel() == 0:
        raise AttnscopeError(f"query position {position} sees no image token")
    out = []
    for layer in trace.layers:
        q, k, attention = trace.layer_qk(layer)
        stats = attention_stats(
            q[None, :, position : position + 1],
            k[None][:, :, keys],
            causal=False,
            scale=attention["scale"],
            softcap=attention["softcap"],
            metrics=("entropy",),
        )
        out.append(stats.rows["entropy"][0, :, 0])
    return torch.stack(out)


def visual_sinks(trace: Trace, factor: float = SINK_FACTOR) -> Tensor:
    """Image tokens whose sink_score exceeds ``factor`` times the mean sink_score of their image,
    per layer and head. bool ``[n_layers, n_heads, T]`` (False outside image spans)."""
    score = trace.cols["sink_score"]
    sinks = torch.zeros(score.shape, dtype=torch.bool)
    for s in ImageLayout.of(trace).images:
        span = score[..., s.start : s.end]  # [L, H, n]
        sinks[..., s.start : s.end] = span > factor * span.nanmean(-1, keepdim=True)
    return sinks


def visual_heads(
    trace: Trace, fraction: float = 0.25, layers: tuple[int, int] | None = None
) -> dict[int, Tensor]:
    """Heads whose visual mass ranks in the top ``fraction`` among the heads of ``layers``
    ([start, end), default all captured). Visual mass is averaged over the response rows (the
    last row without a response). Returns layer -> bool ``[n_heads]``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"head fraction must be in (0, 1], got {fraction}")
    start, end = trace.spans.get("response", (len(trace) - 1, len(trace)))
    mass = visual_mass(trace)[..., start:end].mean(-1)  # [L, H]
    chosen = [
        i
        for i, layer in enumerate(trace.layers)
        if layers is None or layers[0] <= layer < layers[1]
    ]
    if not chosen:
        raise AttnscopeError(f"no captured layer in {layers}; captured: {trace.layers}")
    flat = mass[chosen].flatten()
    n_top = max(1, round(fraction * flat.numel()))
    top = torch.zeros_like(flat, dtype=torch.bool)
    top[torch.argsort(flat, descending=True, stable=True)[:n_top]] = True
    return {trace.layers[i]: row for i, row in zip(chosen, top.view(len(chosen), -1), strict=True)}
