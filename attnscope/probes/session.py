"""One probe session per model: the observers and mask editors attached to it, and positions.

``ProbeSession.of(model)`` is the model's session. Captures attach observers, interventions attach
mask editors (``session.attached(observer=..., editor=...)``); they compose in any nesting, and two
models in one process have independent sessions. While anything is attached, the model runs the
probe's attention function (``probes.interface``), which hands every call of one of its attention
modules to the session as an ``AttentionCall``: editors may replace the mask first (in attach
order), then the call is delegated to the model's own kernel, then observers see it with the mask
that was used. On the last detach the model's attention implementation is restored.

Positions: each module counts the query tokens of the current sequence. A top-level forward without
cached tokens starts a new sequence (every count goes back to 0); a call's queries are the next
``Tq`` tokens and its keys the last ``Tk`` tokens seen (static caches: slot j is position j;
cross-attention: encoder positions ``0..Tk-1``). Packed calls of a vision tower (one per image)
follow one another in the same count.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from attnscope.errors import AttnscopeError
from attnscope.models.families import Site, attention_site
from attnscope.probes import interface


@dataclass
class AttentionCall:
    """One call of an attention module, as the probe received it."""

    site: Site
    module: torch.nn.Module
    query: Tensor  # [B, Hq, Tq, D] post-RoPE
    key: Tensor  # [B, Hkv, Tk, D]
    mask: Any  # the attention mask (after the editors, for observers)
    kwargs: dict  # scaling, sliding_window, softcap, s_aux (learned sinks), ...
    q_index: Tensor  # [Tq] token index of each query in the sequence
    k_index: Tensor  # [Tk] token (or encoder position) index of each key
    value: Tensor | None = None  # [B, Hkv, Tk, D] post-projection values, as the kernel gets them
    computed: Any = None  # what a session's forward computed with the output (its statistics)

    @property
    def scale(self) -> float:
        """The softmax scale the layer uses: the call's ``scaling``, the module's, or 1/sqrt(d)."""
        scaling = self.kwargs.get("scaling")
        if scaling is not None:
            return float(scaling)
        return float(getattr(self.module, "scaling", None) or self.query.shape[-1] ** -0.5)

    @property
    def sliding_window(self) -> int | None:
        return self.kwargs.get("sliding_window")

    @property
    def softcap(self) -> float | None:
        return self.kwargs.get("softcap")

    @property
    def sinks(self) -> Tensor | None:
        """Learned sink logits ``[Hq]`` (gpt-oss), None without sinks: the call's ``s_aux``, which
        transformers' attention modules with sinks pass (their ``sinks`` parameter, the one their
        eager functions read), and which makes the SDPA probe compute with the eager math."""
        sinks = self.kwargs.get("s_aux")
        return sinks.detach() if isinstance(sinks, Tensor) else None

    @property
    def attention(self) -> dict[str, Any]:
        """The parameters that rebuild this call's attention from its q and k (JSON values;
        ``sinks``: the learned sink logits as floats, or None)."""
        sinks = self.sinks
        return dict(
            scale=self.scale,
            causal=self.site.causal,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
            sinks=None if sinks is None else sinks.cpu().tolist(),
        )


Observer = Callable[[AttentionCall], None]
MaskEditor = Callable[[AttentionCall], Any]  # -> replacement mask, or None to keep it
# -> the call's attention output [B, Hq, Tq, Dv] in place of the model's kernel, or None to decline
Forward = Callable[[AttentionCall], Tensor | None]

_sessions: weakref.WeakKeyDictionary[torch.nn.Module, ProbeSession] = weakref.WeakKeyDictionary()


class ProbeSession:
    """The probe of one model (see the module docstring). Use ``ProbeSession.of(model)``."""

    def __init__(self, model: torch.nn.Module) -> None:
        if not hasattr(model, "set_attn_implementation"):
            raise AttnscopeError(
                f"{type(model).__name__} is not a transformers PreTrainedModel; for TransformerLens "
                "models use attnscope.probes.lens.capture_lens"
            )
        self.model = model
        model_type = getattr(model.config, "model_type", "")
        self.sites: dict[torch.nn.Module, Site] = {}
        for name, module in model.named_modules():
            site = attention_site(model_type, name, module)
            if site is not None:
                self.sites[module] = site
        self.observers: list[Observer] = []
        self.editors: list[MaskEditor] = []
        self.forwards: list[Forward] = []
        self._seen: dict[torch.nn.Module, int] = {}
        self._users = 0  # attachments open now
        self._hook: Any = None  # the forward pre-hook while anything is attached

    @classmethod
    def of(cls, model: torch.nn.Module) -> ProbeSession:
        session = _sessions.get(model)
        if session is None:
            session = _sessions[model] = cls(model)
        return session

    def layers(self, role: str) -> dict[torch.nn.Module, int]:
        """Modules of one role (``decoder``, ``encoder``, ``cross``, ``vision``) -> layer index."""
        return {m: s.layer for m, s in self.sites.items() if s.role == role and s.layer >= 0}

    # -- attaching --------------------------------------------------------------------------------
    @contextmanager
    def attached(
        self,
        observer: Observer | None = None,
        editor: MaskEditor | None = None,
        forward: Forward | None = None,
    ) -> Iterator[ProbeSession]:
        """Attach an observer, a mask editor and/or a forward (computes a call's output in place
        of the model's kernel, e.g. ``kernels.fused``) for the duration of the block. Each
        attachment switches the model to the probe (again, if code inside an outer one switched it
        away) and restores what it found on exit."""
        with ExitStack() as stack:
            self._join()
            stack.callback(self._leave)
            stack.enter_context(interface.probe_implementation(self.model))
            if observer is not None:
                self.observers.append(observer)
                stack.callback(self.observers.remove, observer)
            if editor is not None:
                self.editors.append(editor)
                stack.callback(self.editors.remove, editor)
            if forward is not None:
                self.forwards.append(forward)
                stack.callback(self.forwards.remove, forward)
            yield self

    def _join(self) -> None:
        """The first attachment starts watching the model's attention modules and forwards."""
        if self._users == 0:
            self._hook = self.model.register_forward_pre_hook(
                self._forward_starts, with_kwargs=True
            )
            for module in self.sites:
                interface.watching.setdefault(module, []).append(self)
            self._seen.clear()
        self._users += 1

    def _leave(self) -> None:
        """The last attachment to leave stops watching."""
        self._users -= 1
        if self._users == 0:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            self._unwatch()

    def _unwatch(self) -> None:
        for module in self.sites:
            watchers = interface.watching.get(module, [])
            if self in watchers:
                watchers.remove(self)

    def _forward_starts(self, module, args, kwargs) -> None:
        """A top-level forward without cached tokens starts a new sequence."""
        cache = kwargs.get("past_key_values")
        if cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0):
            self._seen.clear()

    # -- one call ---------------------------------------------------------------------------------
    def call(
        self,
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        mask: Any,
        kwargs: dict,
        value: Tensor | None = None,
    ) -> AttentionCall:
        """Count the call's tokens and describe it."""
        site = self.sites[module]
        tq, tk = query.shape[2], key.shape[2]
        n = self._seen.get(module, 0) + tq
        self._seen[module] = n
        dev = query.device
        q_index = torch.arange(n - tq, n, device=dev)
        first = n - tk if (tk <= n and not site.cross) else 0
        k_index = torch.arange(first, first + tk, device=dev)
        return AttentionCall(site, module, query, key, mask, kwargs, q_index, k_index, value)


@contextmanager
def layer_progress(model: torch.nn.Module, disable: bool = False) -> Iterator[None]:
    """A progress bar (tqdm) over the attention layers of one forward of ``model``: it advances
    once per attention call, the total being the model's attention modules (all stacks)."""
    if disable:  # nothing attached: the model keeps its implementation
        yield
        return
    session = ProbeSession.of(model)
    total = sum(1 for site in session.sites.values() if site.layer >= 0)
    with (
        tqdm(total=total, desc="attention layers", unit="layer") as bar,
        session.attached(observer=lambda call: bar.update(1)),
    ):
        yield
