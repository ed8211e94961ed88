"""``capture(model)``: attention statistics of a Hugging Face model while it runs its own kernels."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from attnscope.errors import AttnscopeError
from attnscope.kernels import BACKENDS, attention_stats, resolve_backend
from attnscope.kernels.request import _normalise_metrics
from attnscope.kernels.stats import finish_column
from attnscope.metrics.dense import FAI_HORIZON, WAAD_WINDOW
from attnscope.probes import interface
from attnscope.probes.records import ModuleRecord, stack_of
from attnscope.trace import Trace

CROSS_NAMES = ("encoder_attn", "crossattention", "cross_attn")


class Capture:
    """Context manager that records attention statistics of every attention call of ``model``.

    On entry the model's attention implementation is swapped for a delegating probe (SDPA stays
    SDPA, eager stays eager); on exit the previous implementation of every config is restored,
    also after an exception. Nothing of size L x L is kept.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        metrics: Sequence[str] | None = None,
        layers: Iterable[int] | None = None,
        *,
        backend: str = "auto",
        window: int = WAAD_WINDOW,
        fai_horizon: tuple[int, int] | None = FAI_HORIZON,
        fai_rows: tuple[int, int] | None = None,
        sink_tokens: int = 1,
        spans: Mapping[str, tuple[int, int]] | None = None,
        tokenizer: Any = None,
        keep_qk: Iterable[int] | bool = False,
    ) -> None:
        if not hasattr(model, "set_attn_implementation"):
            raise AttnscopeError(
                f"{type(model).__name__} is not a transformers PreTrainedModel; for TransformerLens "
                "models use attnscope.probes.lens.capture_lens"
            )
        if backend != "auto" and backend not in BACKENDS:
            resolve_backend(backend, torch.empty(0))  # raises with the list of backends
        if window < 1:
            raise ValueError(f"WAAD window must be >= 1, got {window}")
        self.model = model
        self.spans = dict(spans or {})
        self.metrics = _normalise_metrics(metrics, self.spans)
        self.layers = None if layers is None else set(layers)
        self.tokenizer = tokenizer
        self.keep_qk = keep_qk if isinstance(keep_qk, bool) else set(keep_qk)
        self.params = dict(
            backend=backend,
            window=window,
            fai_horizon=fai_horizon,
            fai_rows=fai_rows,
            sink_tokens=sink_tokens,
        )
        self.records: dict[str, ModuleRecord] = {}
        self.input_ids: list[Tensor] = []  # encoder or decoder-only token ids, per call
        self.decoder_ids: list[Tensor] = []  # decoder_input_ids of encoder-decoders, per call
        self.backend_used: str | None = None
        self._names: dict[torch.nn.Module, str] = {}
        self._switch: AbstractContextManager | None = None
        self._hook = None

    # -- context ------------------------------------------------------------------------------
    def __enter__(self) -> Capture:
        self._names = {m: n for n, m in self.model.named_modules()}
        interface.add_observer(self._observe)
        self._hook = self.model.register_forward_pre_hook(self._record_inputs, with_kwargs=True)
        try:
            switch = interface.probe_implementation(self.model)
            switch.__enter__()
            self._switch = switch
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        interface.remove_observer(self._observe)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._switch is not None:
            self._switch.__exit__(None, None, None)
            self._switch = None

    def _record_inputs(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, Tensor) and not ids.is_floating_point():
            self.input_ids.append(ids.detach().cpu())
        decoder_ids = kwargs.get("decoder_input_ids")
        if isinstance(decoder_ids, Tensor):
            self.decoder_ids.append(decoder_ids.detach().cpu())

    # -- one attention call -------------------------------------------------------------------
    @torch.no_grad()
    def _observe(self, module, query: Tensor, key: Tensor, mask, kwargs: dict) -> None:
        name = self._names.get(module)
        if name is None:
            return
        _, layer = stack_of(name)
        if self.layers is not None and layer not in self.layers:
            return
        cross = is_cross_attention(name)
        rec = self.records.get(name)
        if rec is None:
            causal = bool(getattr(module, "is_causal", True)) and not cross
            rec = self.records[name] = ModuleRecord(name, causal=causal)
        b, _, tq, _ = query.shape
        tk = key.shape[2]
        n = rec.seen + tq
        rec.seen = n
        q_index = torch.arange(n - tq, n, device=query.device)
        k_index = (torch.arange(n - tk, n) if tk <= n and not cross else torch.arange(tk)).to(
            query.device
        )
        if rec.pad is None:
            rec.pad = (
                _leading_padding(mask, b, tk) if rec.causal else torch.zeros(b, dtype=torch.long)
            )
        pad = rec.pad.to(query.device)[:, None]
        scaling = kwargs.get("scaling")
        stats = attention_stats(
            query.detach(),
            key.detach(),
            causal=rec.causal,
            scale=stats_scale(query, module, scaling),
            window=self.params["window"],
            fai_horizon=self.params["fai_horizon"],
            fai_rows=self.params["fai_rows"],
            sink_tokens=self.params["sink_tokens"],
            spans=self.spans,
            sliding_window=kwargs.get("sliding_window"),
            softcap=kwargs.get("softcap"),
            backend=self.params["backend"],
            mask=mask,
            q_pos=q_index[None] - pad,
            k_pos=k_index[None] - (0 if cross else pad),
            metrics=self.metrics,
        )
        self.backend_used = stats.backend
        rec.add(q_index, k_index, stats)
        if self.keep_qk is True or (self.keep_qk and layer in self.keep_qk):
            rec.keep_qk(q_index, query, key, k_index)
            rec.attention = dict(
                scale=stats_scale(query, module, scaling),
                causal=rec.causal,
                sliding_window=kwargs.get("sliding_window"),
                softcap=kwargs.get("softcap"),
            )

    # -- results --------------------------------------------------------------------------------
    def stacks(self) -> list[str]:
        """Templates of the captured module stacks, e.g. ``model.layers.{}.self_attn``."""
        return list(dict.fromkeys(stack_of(n)[0] for n in self.records))

    def default_stack(self) -> str:
        """The text decoder when there is one (causal self-attention), else the first stack."""
        causal = [stack_of(n)[0] for n, r in self.records.items() if r.causal]
        return causal[0] if causal else self.stacks()[0]

    def traces(self, stack: str | None = None) -> list[Trace]:
        """One Trace per sequence of the batch (padding dropped) for one stack of modules."""
        if not self.records:
            raise AttnscopeError(
                "no attention call was captured: run the model inside the `with capture(...)` block "
                "(and check that `layers` names existing layer indices)"
            )
        stacks = self.stacks()
        stack = stack or self.default_stack()
        if stack not in stacks:
            raise AttnscopeError(f"unknown stack {stack!r}; captured stacks: {stacks}")
        recs = sorted(
            (r for n, r in self.records.items() if stack_of(n)[0] == stack),
            key=lambda r: stack_of(r.name)[1],
        )
        decoder_side = recs[0].causal or is_cross_attention(recs[0].name)
        id_steps = self.decoder_ids if decoder_side and self.decoder_ids else self.input_ids
        ids = torch.cat(id_steps, dim=1) if id_steps else None
        batch = recs[0].pad.shape[0]
        return [self._trace_of(recs, b, ids, stack) for b in range(batch)]

    @property
    def trace(self) -> Trace:
        """The Trace of a single-sequence run (first stack); batches use ``traces()``."""
        traces = self.traces()
        if len(traces) != 1:
            raise AttnscopeError(f"the capture holds {len(traces)} sequences; use .traces()")
        return traces[0]

    def _trace_of(self, recs: list[ModuleRecord], b: int, ids: Tensor | None, stack: str) -> Trace:
        pad = int(recs[0].pad[b])
        rows: dict[str, list[Tensor]] = {}
        cols: dict[str, list[Tensor]] = {}
        n_tokens = None
        # cross-attention columns are encoder positions, not these tokens: left out
        cross = is_cross_attention(recs[0].name)
        for rec in recs:
            index, merged = rec.rows()
            keep = index >= pad
            n_tokens = int(keep.sum())
            for name, value in merged.items():
                rows.setdefault(name, []).append(value[b][:, keep])
            if cross:
                continue
            for name, total in rec.col_sums.items():
                counts = rec.col_counts.get(name)
                final = finish_column(name, total[b], None if counts is None else counts[b])
                cols.setdefault(name, []).append(_fit(final[..., pad:], n_tokens))
        qk = {}
        for rec in recs:
            if rec.has_qk:
                q, k = rec.qk()
                qk[stack_of(rec.name)[1]] = (q[b, :, pad:], k[b, :, pad:])
        own_tokens = ids is not None and ids.shape[1] - pad == n_tokens  # not a vision tower
        token_ids = ids[b, pad:].tolist() if own_tokens else []
        if self.tokenizer is not None and token_ids:
            tokens = self.tokenizer.convert_ids_to_tokens(token_ids)
        else:
            tokens = [str(i) for i in token_ids] or [f"#{i}" for i in range(n_tokens or 0)]
        return Trace(
            tokens=tokens,
            token_ids=token_ids,
            spans=dict(self.spans),
            layers=[stack_of(r.name)[1] for r in recs],
            n_heads=recs[0].n_heads,
            rows={k: torch.stack(v) for k, v in rows.items()},
            cols={k: torch.stack(v) for k, v in cols.items()},
            meta={
                "model": getattr(self.model.config, "_name_or_path", type(self.model).__name__),
                "architecture": type(self.model).__name__,
                "n_model_layers": getattr(
                    self.model.config.get_text_config(), "num_hidden_layers", None
                ),
                "stack": stack,
                "modules": [r.name for r in recs],
                "backend": self.backend_used,
                "metrics": list(self.metrics),
                "qk_attention": {str(stack_of(r.name)[1]): r.attention for r in recs if r.has_qk},
                **{k: v for k, v in self.params.items() if k != "backend"},
            },
            qk=qk,
        )


def capture(
    model: torch.nn.Module,
    metrics: Sequence[str] | None = None,
    layers: Iterable[int] | None = None,
    **kwargs: Any,
) -> Capture:
    """``with capture(model) as cap: model(**inputs)`` then ``cap.trace``. See ``Capture``."""
    return Capture(model, metrics, layers, **kwargs)


def stats_scale(query: Tensor, module: torch.nn.Module, scaling: float | None) -> float:
    """The softmax scale the layer uses: the call's ``scaling``, the module's, or 1/sqrt(d)."""
    if scaling is not None:
        return float(scaling)
    return float(getattr(module, "scaling", None) or query.shape[-1] ** -0.5)


def is_cross_attention(module_name: str) -> bool:
    return any(c in module_name for c in CROSS_NAMES)


def _fit(col: Tensor, n: int) -> Tensor:
    """Columns cover key indices; keep exactly the ``n`` captured tokens (pad with NaN if short)."""
    if col.shape[-1] >= n:
        return col[..., :n]
    return torch.cat([col, col.new_full((*col.shape[:-1], n - col.shape[-1]), float("nan"))], -1)


def _leading_padding(mask: Tensor | None, batch: int, tk: int) -> Tensor:
    """Leading key columns no query may see: left padding of each sequence. ``[B]``."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.long)
    seen = (mask > torch.finfo(mask.dtype).min / 2) if mask.is_floating_point() else mask.bool()
    seen = seen.expand(batch, -1, -1, -1).any(dim=(1, 2))  # [B, Tk]
    return (~seen).long().cumprod(-1).sum(-1).cpu()
