"""Zero chosen heads' output: their slice of the attention output before the output projection."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from attnscope.errors import AttnscopeError
from attnscope.probes.session import ProbeSession

OUTPUT_PROJECTIONS = ("o_proj", "out_proj")


@contextmanager
def zeroed_heads(model: torch.nn.Module, heads: Iterable[tuple[int, int]]) -> Iterator[None]:
    """Within the block, the decoder heads ``(layer, head)`` add nothing to the residual stream:
    a pre-hook on each layer's output projection zeroes the head's ``head_dim`` slice of its
    input ``[B, T, Hq * head_dim]``."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    modules = {s.layer: m for m, s in ProbeSession.of(model).sites.items() if s.role == "decoder"}
    hooks = []
    try:
        for layer, chosen in by_layer.items():
            if layer not in modules:
                raise AttnscopeError(f"no decoder attention layer {layer}; have {sorted(modules)}")
            attn = modules[layer]
            proj = next((getattr(attn, n) for n in OUTPUT_PROJECTIONS if hasattr(attn, n)), None)
            if proj is None:
                raise AttnscopeError(
                    f"{type(attn).__name__} has no output projection {OUTPUT_PROJECTIONS}"
                )
            n_heads = model.config.get_text_config().num_attention_heads
            size = proj.in_features // n_heads
            keep = torch.ones(proj.in_features)
            for h in chosen:
                keep[h * size : (h + 1) * size] = 0

            def zero(module, args, keep=keep):
                return (args[0] * keep.to(args[0]),)

            hooks.append(proj.register_forward_pre_hook(zero))
        yield
    finally:
        for hook in hooks:
            hook.remove()
