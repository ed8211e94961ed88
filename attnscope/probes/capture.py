"""``capture(model)``: attention statistics of a Hugging Face model while it runs its own kernels."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from attnscope.errors import AttnscopeError
from attnscope.kernels import attention_stats
from attnscope.kernels.config import StatsConfig
from attnscope.kernels.fused import fused_attention
from attnscope.kernels.stats import AttentionStats, finish_column
from attnscope.kernels.table import TOKEN_METRICS, known_metrics
from attnscope.metrics.dense import analysed_rows, fai_selection
from attnscope.models.families import stack_of
from attnscope.probes.records import ModuleRecord
from attnscope.probes.session import AttentionCall, ProbeSession
from attnscope.trace import Trace


class Capture:
    """Context manager that records attention statistics of every attention call of ``model``.

    ``config`` (``StatsConfig``) says what to compute; ``metrics``, ``layers`` and keyword
    ``shortcuts`` (``backend``, ``window``, ``fai_horizon``, ``fai_rows``, ``sink_tokens``,
    ``spans``, ``keep_qk``) override its fields. On entry the capture attaches to the model's probe
    session (``ProbeSession``), which swaps the attention implementation for a delegating probe
    (SDPA stays SDPA, eager stays eager); on exit the previous implementation of every config is
    restored, also after an exception. Nothing of size L x L is kept.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        metrics: Sequence[str] | None = None,
        layers: Iterable[int] | None = None,
        *,
        config: StatsConfig | None = None,
        tokenizer: Any = None,
        **shortcuts: Any,
    ) -> None:
        self.session = ProbeSession.of(model)
        given = {"metrics": metrics, "layers": layers}
        shortcuts.update({k: v for k, v in given.items() if v is not None})
        self.config = StatsConfig.build(config, **shortcuts)
        check_layers(model, self.config)
        if isinstance(self.config.fai_rows, str):
            raise ValueError(
                f"fai_rows={self.config.fai_rows!r} is resolved by analyze() for a generation; "
                "capture() takes (start, end) query positions"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.records: dict[str, ModuleRecord] = {}
        self.input_ids: list[Tensor] = []  # encoder or decoder-only token ids, per call
        self.decoder_ids: list[Tensor] = []  # decoder_input_ids of encoder-decoders, per call
        self.backends: dict[str, str] = {}  # backend that ran -> why (first call that used it)
        self._attached: AbstractContextManager | None = None
        self._hook = None

    @property
    def spans(self) -> dict[str, tuple[int, int]]:
        return self.config.span_dict

    # -- context ------------------------------------------------------------------------------
    def __enter__(self) -> Capture:
        self._hook = self.model.register_forward_pre_hook(self._record_inputs, with_kwargs=True)
        try:
            fused = None if self.config.exact_logits else self._forward
            attached = self.session.attached(observer=self._observe, forward=fused)
            attached.__enter__()
            self._attached = attached
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._attached is not None:
            self._attached.__exit__(None, None, None)
            self._attached = None

    def _record_inputs(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, Tensor) and not ids.is_floating_point():
            self.input_ids.append(ids.detach().cpu())
        decoder_ids = kwargs.get("decoder_input_ids")
        if isinstance(decoder_ids, Tensor):
            self.decoder_ids.append(decoder_ids.detach().cpu())

    # -- one attention call -------------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, call: AttentionCall) -> Tensor | None:
        """``exact_logits=False``: a captured layer's output with its statistics in one pass
        (``kernels.fused``); the statistics wait in ``call.computed`` for ``_observe``. Declines
        (the model's kernel runs) for layers not captured and for dropout in training."""
        dropout = call.kwargs.get("dropout", 0.0)
        if (
            call.value is None
            or not self.config.wants_layer(call.site.layer)
            or (call.module.training and dropout)
        ):
            return None
        config, kwargs = self._stats_inputs(call)
        out, call.computed = fused_attention(
            call.query.detach(), call.key.detach(), call.value.detach(), config, **kwargs
        )
        return out

    def _stats_inputs(self, call: AttentionCall) -> tuple[StatsConfig, dict[str, Any]]:
        """The config and keyword arguments of ``attention_stats`` for one call (positions
        without the sequence's leading padding, found on the module's first call)."""
        site = call.site
        rec = self.records.get(site.name)
        if rec is None:
            rec = self.records[site.name] = ModuleRecord(site.name, site.causal, site.role)
        b, tk = call.query.shape[0], call.key.shape[2]
        if rec.pad is None:
            rec.pad = (
                _leading_padding(call.mask, b, tk)
                if site.causal
                else torch.zeros(b, dtype=torch.long)
            )
        pad = rec.pad.to(call.query.device)[:, None]
        config, tokens = self._head_inputs(site.role, rec.pad, int(call.k_index.max()))
        return config, dict(
            tokens=tokens if tokens is None else tokens.to(call.query.device),
            causal=site.causal,
            scale=call.scale,
            sliding_window=call.sliding_window,
            softcap=call.softcap,
            sinks=call.sinks,
            mask=call.mask,
            q_pos=call.q_index[None] - pad,
            k_pos=call.k_index[None] - (0 if site.cross else pad),
        )

    @torch.no_grad()
    def _observe(self, call: AttentionCall) -> None:
        site = call.site
        if not self.config.wants_layer(site.layer):
            return
        stats = call.computed
        if stats is None:
            config, kwargs = self._stats_inputs(call)
            stats = attention_stats(call.query.detach(), call.key.detach(), config, **kwargs)
        rec = self.records[site.name]
        pad = rec.pad.to(call.query.device)[:, None]
        self.backends.setdefault(stats.backend, stats.reason)
        k_index = call.k_index
        if "fai" in stats.col_counts and site.causal:  # a sliding cache may have evicted keys
            k_index, stats = _count_evicted_keys(stats, call.q_index, k_index, pad, self.config)
        rec.add(call.q_index, k_index, stats)
        if self.config.keeps_qk(site.layer):
            rec.keep_qk(call.q_index, call.query, call.key, call.k_index)
            rec.attention = call.attention

    def _head_inputs(self, role: str, pad: Tensor, last: int) -> tuple[StatsConfig, Tensor | None]:
        """The call's config and the token ids by position ``[B, N]`` (-1 past the recorded ids)
        for the token head metrics. Cross-attention keys are no tokens of the sequence, and a
        stack whose positions outrun the recorded ids (a vision tower) has none: the token
        metrics are left out there (``prev_token`` needs positions only)."""
        wanted = [m for m in self.config.metrics or () if m in TOKEN_METRICS]
        if not wanted:
            return self.config, None
        decoder = role == "decoder" and self.decoder_ids
        steps = self.decoder_ids if decoder else self.input_ids
        ids = torch.cat(steps, dim=1) if steps else None  # [B, N] by sequence index
        if role == "cross" or ids is None or ids.shape[1] <= last:
            kept = tuple(m for m in self.config.metrics or () if m not in TOKEN_METRICS)
            return self.config.replace(metrics=kept), None
        index = torch.arange(ids.shape[1])[None] + pad[:, None]  # position p -> index p + pad
        return self.config, ids.gather(1, index.clamp(max=ids.shape[1] - 1)).where(
            index < ids.shape[1], -1
        )

    # -- results --------------------------------------------------------------------------------
    def stacks(self, role: str | None = None) -> list[str]:
        """Templates of the captured module stacks, e.g. ``model.layers.{}.self_attn`` (only
        those of ``role``: decoder, encoder, cross or vision, when given)."""
        return list(
            dict.fromkeys(stack_of(n)[0] for n, r in self.records.items() if role in (None, r.role))
        )

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
        restarted = [n for n, r in self.records.items() if r.restarted]
        if restarted:
            raise AttnscopeError(
                f"this capture saw more than one independent forward pass ({restarted[0]} started "
                "a new sequence); its statistics would mix sequences: use one capture per forward "
                "pass or generate() call"
            )
        stacks = self.stacks()
        stack = stack or self.default_stack()
        if stack not in stacks:
            raise AttnscopeError(f"unknown stack {stack!r}; captured stacks: {stacks}")
        recs = sorted(
            (r for n, r in self.records.items() if stack_of(n)[0] == stack),
            key=lambda r: stack_of(r.name)[1],
        )
        decoder_side = recs[0].causal or recs[0].cross
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
        cross = recs[0].cross
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
            spans=self.config.span_dict,
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
                "attention": "cross"
                if cross
                else ("causal" if recs[0].causal else "bidirectional"),
                "modules": [r.name for r in recs],
                "backend": ", ".join(self.backends),
                "backend_reason": "; ".join(self.backends.values()),
                "stats_config": self.config.to_json(),
                "metrics": list(
                    self.config.metrics
                    or known_metrics(self.config.span_names, sinks="sink_logit_mass" in rows)
                ),
                "qk_attention": {str(stack_of(r.name)[1]): r.attention for r in recs if r.has_qk},
                "window": self.config.window,
                "fai_horizon": self.config.fai_horizon,
                "fai_rows": self.config.fai_rows,
                "sink_tokens": self.config.sink_tokens,
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


def check_layers(model: torch.nn.Module, config: StatsConfig) -> None:
    """Refuse ``layers`` / ``keep_qk`` indices that no attention stack of ``model`` has, and
    ``keep_qk`` layers left out of ``layers``: a capture would silently skip them."""
    numbered = [s for s in ProbeSession.of(model).sites.values() if s.layer >= 0]
    sizes: dict[str, int] = {}  # role of each stack -> its number of layers
    for site in numbered:
        sizes[site.role] = max(sizes.get(site.role, 0), site.layer + 1)
    name = type(model).__name__
    if len(set(sizes.values())) == 1:
        n = next(iter(sizes.values()))
        have = f"{name}'s layers 0-{n - 1} ({n} layers)"
    elif sizes:
        have = f"{name}'s layers " + ", ".join(f"0-{n - 1} ({role})" for role, n in sizes.items())
    else:
        have = f"{name}, which has no numbered attention layers"
    if config.layers == ():
        raise AttnscopeError(f"layers is empty: give indices from {have}, or None for all")
    existing = {site.layer for site in numbered}
    keep = () if isinstance(config.keep_qk, bool) else config.keep_qk
    for field, indices in (("layers", config.layers or ()), ("keep_qk", keep)):
        bad = [i for i in indices if i not in existing]
        if bad:
            start = " (indices start at 0)" if min(bad) < 0 else ""
            raise AttnscopeError(f"{field} {bad} not in {have}{start}")
    left_out = sorted(set(keep) - set(config.layers or keep))
    if left_out:
        raise AttnscopeError(
            f"keep_qk {left_out} are not among the captured layers {list(config.layers)}: "
            "add them to layers"
        )


def _count_evicted_keys(
    stats: AttentionStats, q_index: Tensor, k_index: Tensor, pad: Tensor, config: StatsConfig
) -> tuple[Tensor, AttentionStats]:
    """Extend a causal call's columns back over the keys a sliding-window cache has evicted.

    The call's rows give those keys no attention, but FAI counts every analysed row within a
    key's horizon, seen or not. ``q_index`` ``[Tq]``, ``k_index`` ``[Tk]`` (contiguous) and
    ``pad`` ``[B, 1]`` (leading padding). Returns key indices from the earliest key any row is
    within the horizon of, and the statistics with zero sums and the FAI row counts there.
    """
    first = int(k_index[0])
    if first == 0 or not q_index.numel():
        return k_index, stats
    start = 0
    if config.fai_horizon is not None:
        start = max(0, int(q_index.min()) - config.fai_horizon[1])
    if start >= first:
        return k_index, stats
    extra = torch.arange(start, first, device=k_index.device)  # [E] evicted key indices
    counts = stats.col_counts["fai"]  # [B, 1|Hq, Tk]
    valid = torch.isfinite(stats.lse)  # [B, Hq, Tq]
    valid = valid if counts.shape[1] > 1 else valid[:, :1]
    q_pos = (q_index[None] - pad)[:, None]  # [B, 1, Tq]
    rows = analysed_rows(valid, q_pos, config.fai_rows)  # [B, 1|Hq, Tq]
    dist = (q_index[:, None] - extra[None, :])[None, None]  # [1, 1, Tq, E]
    added = (fai_selection(dist, config.fai_horizon) & rows[..., None]).sum(-2).float()

    def widen(cols: dict[str, Tensor], front: dict[str, Tensor]) -> dict[str, Tensor]:
        """``cols`` with the evicted keys' columns in front: ``front[name]``, else zeros."""
        zeros = {n: v.new_zeros((*v.shape[:-1], len(extra))) for n, v in cols.items()}
        return {n: torch.cat([front.get(n, zeros[n]), v], -1) for n, v in cols.items()}

    return torch.cat([extra, k_index]), AttentionStats(
        stats.rows,
        widen(stats.col_sums, {}),
        widen(stats.col_counts, {"fai": added}),
        stats.lse,
        stats.backend,
        stats.reason,
    )


def _fit(col: Tensor, n: int) -> Tensor:
    """Columns cover key indices; keep exactly the ``n`` captured tokens (pad with NaN if short)."""
    if col.shape[-1] >= n:
        return col[..., :n]
    return torch.cat([col, col.new_full((*col.shape[:-1], n - col.shape[-1]), float("nan"))], -1)


def _leading_padding(mask: Tensor | None, batch: int, tk: int) -> Tensor:
    """Leading key columns no query may see: left padding of each sequence. ``[B]``."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.long)
    width = min(tk, 64)  # leading columns only, widened until every sequence sees one
    while True:
        lead = mask[..., :width]  # [B|1, H|1, Tq, width]
        seen = (lead > torch.finfo(lead.dtype).min / 2) if lead.is_floating_point() else lead.bool()
        seen = seen.expand(batch, -1, -1, -1).any(dim=(1, 2))  # [B, width]
        if width >= tk or bool(seen.any(-1).all()):
            return (~seen).long().cumprod(-1).sum(-1).cpu()
        width = min(tk, width * 4)
