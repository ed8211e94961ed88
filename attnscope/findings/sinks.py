"""Attention sinks (Gu et al., "When Attention Sink Emerges in Language Models", ICLR 2025): the
share of (sample, layer, head) whose first token receives a mean attention alpha_0 above 0.3, on
natural English text cut to T = 64 tokens (their Sink_1^0.3 metric; METRICS.md sink ratio)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
import torch
from torch import Tensor
from tqdm.auto import tqdm

from attnscope import metrics
from attnscope.errors import AttnscopeError
from attnscope.findings.table import Row
from attnscope.findings.texts import english_paragraphs, take
from attnscope.models.loaded import LoadedModel
from attnscope.probes.capture import capture
from attnscope.trace import Trace

SINK_TOKENS = 64  # T of Gu et al.


def sink_inputs(
    tokenizer: Any, texts: Sequence[str], n_tokens: int = SINK_TOKENS, bos: bool = True
) -> Tensor:
    """The first ``n_tokens`` tokens of each text ``[S, n_tokens]``; with ``bos`` the sequence
    starts with the tokenizer's BOS token (when it has one), else with the text's first token."""
    bos_id = tokenizer.bos_token_id if bos else None
    rows = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        ids = ([bos_id] if bos_id is not None else []) + ids
        if len(ids) < n_tokens:
            raise AttnscopeError(
                f"text {i} has {len(ids)} tokens, fewer than T = {n_tokens}; use longer texts"
            )
        rows.append(ids[:n_tokens])
    return torch.tensor(rows)


def alpha0(traces: Sequence[Trace]) -> Tensor:
    """First-token sink score alpha_0 of every head of every trace ``[S, L, H]``."""
    missing = [i for i, t in enumerate(traces) if "sink_score" not in t.cols]
    if missing:
        raise AttnscopeError(f"traces {missing} lack the column metric 'sink_score'")
    return torch.stack([t.cols["sink_score"][..., 0] for t in traces])


def sink_ratio(alpha: Tensor, eps: float = metrics.SINK_EPS) -> float:
    """% of all entries of ``alpha`` (e.g. ``[S, L, H]``) above ``eps``."""
    return 100 * float(metrics.sink_heads(alpha, eps).float().mean())


def layer_sink_ratio(alpha: Tensor, eps: float = metrics.SINK_EPS) -> Tensor:
    """% of (sample, head) per layer with alpha_0 > ``eps``: ``[S, L, H]`` -> ``[L]``."""
    return 100 * metrics.sink_heads(alpha, eps).float().mean((0, 2))


@torch.no_grad()
def first_token_sink_scores(
    lm: LoadedModel, ids: Tensor, batch_size: int = 8, progress: bool = True
) -> Tensor:
    """alpha_0 of every head for each row of ``ids`` ``[S, T]`` (no padding), captured while the
    model runs its own attention. ``[S, L, H]``."""
    scores = []
    for batch in tqdm(
        ids.split(batch_size), desc="sink scores", unit="batch", disable=not progress
    ):
        batch = batch.to(lm.model.device)
        with capture(lm.model, metrics=("sink_score",)) as cap:
            lm.model(input_ids=batch, attention_mask=torch.ones_like(batch), logits_to_keep=1)
        scores.append(alpha0(cap.traces()))
    return torch.cat(scores)


@dataclass
class SinkResult:
    model: str
    n_tokens: int
    eps: float
    layers: list[int]
    alpha0: Tensor  # [S, L, H] with the BOS token first
    alpha0_no_bos: Tensor | None  # [S, L, H] the same texts without BOS (None: not measured)
    seconds: float

    @property
    def ratio(self) -> float:
        return sink_ratio(self.alpha0, self.eps)

    def layer_ratio(self) -> Tensor:
        return layer_sink_ratio(self.alpha0, self.eps)

    def figure(self) -> go.Figure:
        """Per layer: % of (sample, head) that are first-token sinks, and the mean alpha_0."""
        fig = go.Figure()
        fig.add_bar(x=self.layers, y=self.layer_ratio().tolist(), name="sink ratio, with <bos> (%)")
        if self.alpha0_no_bos is not None:
            fig.add_bar(
                x=self.layers,
                y=layer_sink_ratio(self.alpha0_no_bos, self.eps).tolist(),
                name="sink ratio, without <bos> (%)",
            )
        fig.add_scatter(
            x=self.layers,
            y=(100 * self.alpha0.mean((0, 2))).tolist(),
            mode="lines+markers",
            name="mean alpha_0 x 100, with <bos>",
        )
        fig.add_hline(
            y=self.ratio, line_dash="dot", annotation_text=f"all layers {self.ratio:.1f}%"
        )
        fig.update_layout(
            title=f"First-token attention sinks per layer ({self.model}, T = {self.n_tokens}, "
            f"alpha_0 > {self.eps}, {self.alpha0.shape[0]} texts)",
            xaxis_title="layer",
            yaxis_title="% of (text, head)",
            yaxis_range=[0, 100],
            barmode="group",
        )
        return fig

    def verdict(self) -> str:
        above = self.ratio > 50
        return (
            f"{'agrees' if above else 'disagrees'}: {self.ratio:.0f}% of (text, layer, head) are "
            f"first-token sinks ({'above' if above else 'not above'} 50%)"
        )

    def row(self) -> Row:
        per_layer = self.layer_ratio()
        s, n_l, n_h = self.alpha0.shape
        no_bos = (
            ""
            if self.alpha0_no_bos is None
            else f"; without <bos> (first text token is the sink candidate): "
            f"{sink_ratio(self.alpha0_no_bos, self.eps):.1f}%"
        )
        return Row(
            finding="Attention sink on the first token (Gu et al., ICLR 2025)",
            published="Sinks appear in every auto-regressive LM they test, small ones included; "
            "first-token sink ratio (alpha_0 > 0.3, T = 64) well above 50% for most pretrained "
            "LMs (read from the paper's figures; approximate)",
            measured=f"{self.ratio:.1f}% of {s * n_l * n_h} (text, layer, head) with <bos> first; "
            f"per layer {float(per_layer.min()):.0f}-{float(per_layer.max()):.0f}%{no_bos}",
            how=f"{self.model}: {s} original English paragraphs, first T = {self.n_tokens} tokens "
            f"(<bos> + {self.n_tokens - 1}); alpha_0 = trace.cols['sink_score'][..., 0], the mean "
            f"attention token 0 receives from all T queries, captured on SDPA; sink if > {self.eps}",
        )


def measure_sinks(
    lm: LoadedModel,
    n_samples: int = 32,
    n_tokens: int = SINK_TOKENS,
    eps: float = metrics.SINK_EPS,
    without_bos: bool = True,
    progress: bool = True,
) -> SinkResult:
    """Sink ratio of ``lm`` on the first ``n_samples`` packaged English paragraphs."""
    if lm.kind != "causal-lm":
        raise AttnscopeError(f"sink ratio needs a causal LM; {lm.name!r} is a {lm.kind} model")
    start = time.perf_counter()
    texts = take(english_paragraphs(), n_samples, "English paragraphs")
    with_bos = first_token_sink_scores(
        lm, sink_inputs(lm.tokenizer, texts, n_tokens), progress=progress
    )
    no_bos = (
        first_token_sink_scores(
            lm, sink_inputs(lm.tokenizer, texts, n_tokens, bos=False), progress=progress
        )
        if without_bos and lm.tokenizer.bos_token_id is not None
        else None
    )
    return SinkResult(
        model=lm.name,
        n_tokens=n_tokens,
        eps=eps,
        layers=list(range(with_bos.shape[1])),
        alpha0=with_bos,
        alpha0_no_bos=no_bos,
        seconds=time.perf_counter() - start,
    )
