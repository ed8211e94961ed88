"""Registration of the probe's attention functions with transformers (process-global, done once).

Two implementations are registered, each with the mask function its delegate expects:
``attnscope`` (SDPA masks, delegates to SDPA) and ``attnscope_eager`` (eager masks, delegates to the
module's own eager function, so ``output_attentions`` keeps working). Every call is delegated with
its arguments unchanged, so the model's output is untouched; then the active capture sessions are
told about the call.

Mask editors are the one way to change a call (interventions): each registered editor may return a
replacement for the attention mask (e.g. an additive float mask ``[B, 1|Hq, Tq, Tk]`` carrying a
score bias) before delegation; observers are then told about the call with the edited mask, so
captured statistics include the edit. With no editor registered, or every editor returning None,
calls are delegated unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

SDPA_NAME = "attnscope"
EAGER_NAME = "attnscope_eager"

Observer = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Any, dict], None]
_observers: list[Observer] = []
# (module, query, key, attention_mask, kwargs) -> replacement mask, or None to leave it as it is
MaskEditor = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Any, dict], Any]
_mask_editors: list[MaskEditor] = []


def module_eager(module: torch.nn.Module) -> Callable:
    """The eager attention function defined next to the module's class in its modeling file."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward to delegate to")
    return fn


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Bool mask (True = attend) -> additive float mask for eager functions."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(dtype).min
    )


def _notify(module, query, key, attention_mask, kwargs) -> None:
    for observe in list(_observers):
        observe(module, query, key, attention_mask, kwargs)


def _edit_mask(module, query, key, attention_mask, kwargs):
    for edit in list(_mask_editors):
        edited = edit(module, query, key, attention_mask, kwargs)
        if edited is not None:
            attention_mask = edited
    return attention_mask


def _sdpa_probe(module, query, key, value, attention_mask, **kwargs):
    attention_mask = _edit_mask(module, query, key, attention_mask, kwargs)
    if kwargs.get("softcap") is not None:  # SDPA refuses softcap: compute with the eager math
        out = module_eager(module)(
            module, query, key, value, _additive(attention_mask, query.dtype), **kwargs
        )
    else:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _notify(module, query, key, attention_mask, kwargs)
    return out


def _eager_probe(module, query, key, value, attention_mask, **kwargs):
    attention_mask = _edit_mask(module, query, key, attention_mask, kwargs)
    out = module_eager(module)(module, query, key, value, attention_mask, **kwargs)
    _notify(module, query, key, attention_mask, kwargs)
    return out


AttentionInterface.register(SDPA_NAME, _sdpa_probe)
AttentionMaskInterface.register(SDPA_NAME, sdpa_mask)
AttentionInterface.register(EAGER_NAME, _eager_probe)
AttentionMaskInterface.register(EAGER_NAME, eager_mask)


def probe_name_for(implementation: str | None) -> str:
    """Our implementation that reproduces ``implementation``'s outputs (flash -> SDPA masks; ours
    map to themselves, so probes nest)."""
    return EAGER_NAME if implementation in (None, "eager", EAGER_NAME) else SDPA_NAME


def add_observer(fn: Observer) -> None:
    _observers.append(fn)


def remove_observer(fn: Observer) -> None:
    if fn in _observers:
        _observers.remove(fn)


def add_mask_editor(fn: MaskEditor) -> None:
    _mask_editors.append(fn)


def remove_mask_editor(fn: MaskEditor) -> None:
    if fn in _mask_editors:
        _mask_editors.remove(fn)


def all_configs(model: torch.nn.Module) -> list[Any]:
    """Every config object reachable from the model: submodels' configs and nested sub-configs."""
    found: dict[int, Any] = {}
    queue = [
        m.config
        for m in model.modules()
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation_internal")
    ]
    while queue:
        cfg = queue.pop()
        if id(cfg) in found:
            continue
        found[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}):
            sub = getattr(cfg, key, None)
            if sub is not None:
                queue.append(sub)
    return list(found.values())


@contextmanager
def probe_implementation(model: torch.nn.Module) -> Iterator[None]:
    """Switch ``model`` to the probe matching its implementation; on exit, also after an error,
    restore the implementation of every config and sub-config exactly."""
    saved = [(c, c._attn_implementation_internal) for c in all_configs(model)]
    try:
        model.set_attn_implementation(probe_name_for(model.config._attn_implementation))
        yield
    finally:
        for config, impl in saved:
            config._attn_implementation_internal = impl
