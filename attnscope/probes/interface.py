"""The probe's attention functions, registered with transformers once per process.

Two implementations are registered, each with the mask function its delegate expects:
``attnscope`` (SDPA masks, delegates to SDPA) and ``attnscope_eager`` (eager masks, delegates to the
module's own eager function, so ``output_attentions`` keeps working). A call of an attention module
that a probe session watches (``probes.session``) is described once per session; the sessions'
mask editors may replace the mask (interventions), the call is delegated to the model's own kernel
with that mask, then the sessions' observers see it. Calls of modules nobody watches are delegated
unchanged, so the model's output is untouched unless an editor changes the mask or a session's
forward computes the output itself (the fused forward, ``exact_logits=False``).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

SDPA_NAME = "attnscope"
EAGER_NAME = "attnscope_eager"

# attention module -> the active probe sessions watching it (``ProbeSession``; usually one)
watching: weakref.WeakKeyDictionary[torch.nn.Module, list[Any]] = weakref.WeakKeyDictionary()


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


def _probe(delegate: Callable, module, query, key, value, attention_mask, kwargs):
    """Describe the call to each watching session, apply their edits, delegate, then notify."""
    sessions = watching.get(module)
    if not sessions:
        return delegate(module, query, key, value, attention_mask, **kwargs)
    calls = [s.call(module, query, key, attention_mask, kwargs, value) for s in sessions]
    for session, call in zip(sessions, calls, strict=True):
        for edit in list(session.editors):
            call.mask = attention_mask
            edited = edit(call)
            if edited is not None:
                attention_mask = edited
    out = None
    for session, call in zip(sessions, calls, strict=True):
        call.mask = attention_mask
        for forward in list(session.forwards):  # the first that computes the output serves
            if out is None:
                computed = forward(call)  # [B, Hq, Tq, Dv]
                out = None if computed is None else (computed.transpose(1, 2).contiguous(), None)
    if out is None:
        out = delegate(module, query, key, value, attention_mask, **kwargs)
    for session, call in zip(sessions, calls, strict=True):
        for observe in list(session.observers):
            observe(call)
    return out


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    # SDPA cannot take a softcap or learned sinks (s_aux): compute those with the module's eager
    # math, on the mask eager attention would get
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        mask = _eager_mask(module, attention_mask, query, key, kwargs.get("is_causal"))
        return module_eager(module)(module, query, key, value, mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _eager_mask(
    module: torch.nn.Module,
    mask: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    is_causal: bool | None,
) -> torch.Tensor | None:
    """The additive mask that reproduces SDPA with ``mask``: a bool mask converted, and None on a
    causal module with several queries made the causal mask SDPA's ``is_causal`` applies (aligned
    to the first key: Tq == Tk, or a static cache's empty slots after the prompt).
    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``."""
    tq, tk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if mask is None and causal and tq > 1:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril()[None, None]
    return _additive(mask, query.dtype)  # [B|1, 1, Tq, Tk] or None


def _sdpa_probe(module, query, key, value, attention_mask, **kwargs):
    return _probe(_sdpa, module, query, key, value, attention_mask, kwargs)


def _eager_probe(module, query, key, value, attention_mask, **kwargs):
    return _probe(module_eager(module), module, query, key, value, attention_mask, kwargs)


AttentionInterface.register(SDPA_NAME, _sdpa_probe)
AttentionMaskInterface.register(SDPA_NAME, sdpa_mask)
AttentionInterface.register(EAGER_NAME, _eager_probe)
AttentionMaskInterface.register(EAGER_NAME, eager_mask)


def probe_name_for(implementation: str | None) -> str:
    """Our implementation that reproduces ``implementation``'s outputs (flash -> SDPA masks; ours
    map to themselves, so probes nest)."""
    return EAGER_NAME if implementation in (None, "eager", EAGER_NAME) else SDPA_NAME


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
