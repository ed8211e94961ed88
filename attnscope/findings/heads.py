"""Local vs global heads and the sawtooth of local heads (Li et al. 2025, section 3: "locally
focused heads produce a sawtooth pattern near the diagonal indicating phrasal chunks").

Head span (METRICS.md) splits heads into local (bottom 30%) and global (top 30%). The sawtooth is
read from each head's attention, rebuilt exactly from the kept post-RoPE queries and keys:

- dominant distance d_t = t - argmax_{1 <= s <= t} A[t, s] for rows t >= 1 (the first token, the
  usual sink, is left out, so a head that parks attention there does not hide its local pattern);
- inside a phrasal chunk every row attends to the chunk's start, so d rises by exactly 1 per row
  (the dominant key is *held*); a new chunk *resets* d to a smaller value;
- a *tooth* is a reset right after at least ``min_rise`` consecutive +1 steps (the same key held
  for at least min_rise + 1 rows) that topped out within ``max_width`` tokens of the diagonal
  (near the diagonal: a global head that holds a far token and then moves to a newer one does not
  draw teeth);
- a head is a sawtooth head when it shows at least ``min_rate`` teeth per row, pooled over texts.

A previous-token head (d = 1 throughout), a self-attending head (d = 0) and a head anchored to
one far key (d rising forever, no reset) have no teeth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import pairwise

import plotly.graph_objects as go
import torch
from torch import Tensor
from tqdm.auto import tqdm

from attnscope import metrics
from attnscope.errors import AttnscopeError
from attnscope.findings.table import Row
from attnscope.findings.texts import english_paragraphs, take
from attnscope.kernels.tiles import row_probabilities
from attnscope.metrics.dense import WAAD_WINDOW
from attnscope.models.loaded import LoadedModel
from attnscope.probes.capture import capture
from attnscope.trace import Trace

MIN_RISE = 2
MAX_WIDTH = WAAD_WINDOW  # a tooth tops out at most 10 tokens from the diagonal
MIN_RATE = 0.05  # teeth per row: one tooth every 20 tokens


def dominant_distance(probs: Tensor) -> Tensor:
    """``probs`` ``[T, T]`` of one head over positions 0..T-1 -> ``d`` ``[T - 1]`` for rows
    1..T-1: distance to the row's most attended key other than the first token."""
    t = torch.arange(1, probs.shape[0])
    return t - (probs[1:, 1:].argmax(-1) + 1)


def count_teeth(d: Tensor, min_rise: int = MIN_RISE, max_width: int = MAX_WIDTH) -> int:
    """Resets (``d`` drops) that directly follow at least ``min_rise`` consecutive +1 steps and
    start from a distance of at most ``max_width``."""
    teeth, run = 0, 0
    for before, after in pairwise(d.tolist()):
        if after == before + 1:
            run += 1
            continue
        if after < before and run >= min_rise and before <= max_width:
            teeth += 1
        run = 0
    return teeth


def head_probabilities(trace: Trace, layer: int, head: int) -> Tensor:
    """Exact attention ``[T, T]`` of one head of a trace that kept that layer's queries and keys."""
    q, k, how = trace.layer_qk(layer)
    return row_probabilities(
        q.float(),
        k.float(),
        head,
        torch.arange(q.shape[1]),
        scale=how["scale"],
        causal=how["causal"],
        sliding_window=how["sliding_window"],
        softcap=how["softcap"],
        sinks=how.get("sinks"),
    )


def trace_teeth(trace: Trace, min_rise: int = MIN_RISE, max_width: int = MAX_WIDTH) -> Tensor:
    """Teeth of every head of a trace ``[L, H]`` (rows counted: ``len(trace) - 1`` per head)."""
    return torch.tensor(
        [
            [
                count_teeth(
                    dominant_distance(head_probabilities(trace, layer, h)), min_rise, max_width
                )
                for h in range(trace.n_heads)
            ]
            for layer in trace.layers
        ]
    )


@dataclass
class HeadsResult:
    model: str
    layers: list[int]
    span: Tensor  # [S, L, H] head span (mean look-back distance over all rows) per text
    teeth: Tensor  # [L, H] teeth summed over texts
    rows: int  # rows per head summed over texts
    fraction: float
    min_rise: int
    max_width: int
    min_rate: float
    n_tokens: list[int]  # tokens per text
    seconds: float

    @property
    def mean_span(self) -> Tensor:  # [L, H]
        return self.span.mean(0)

    @property
    def groups(self) -> dict[str, Tensor]:  # local / global, bool [L, H]
        return metrics.head_groups(self.mean_span, self.fraction)

    @property
    def rate(self) -> Tensor:  # [L, H] teeth per row
        return self.teeth / self.rows

    @property
    def sawtooth(self) -> Tensor:  # [L, H] bool
        return self.rate >= self.min_rate

    def share(self, group: str | None) -> tuple[int, int]:
        """(sawtooth heads, heads) in a group (``local``, ``global``) or among all heads."""
        members = torch.ones_like(self.sawtooth) if group is None else self.groups[group]
        return int((self.sawtooth & members).sum()), int(members.sum())

    def figure(self) -> go.Figure:
        """Head span of every head per layer; colour = group, diamond = sawtooth head."""
        groups = self.groups
        fig = go.Figure()
        for name, colour in (("local", "seagreen"), ("global", "crimson"), ("other", "gray")):
            mask = groups[name] if name != "other" else ~(groups["local"] | groups["global"])
            idx = mask.nonzero().tolist()
            fig.add_scatter(
                x=[self.layers[i] + (h - 1.5) * 0.12 for i, h in idx],
                y=[float(self.mean_span[i, h]) for i, h in idx],
                mode="markers",
                name=f"{name} heads",
                marker=dict(
                    color=colour,
                    size=10,
                    symbol=["diamond" if self.sawtooth[i, h] else "circle" for i, h in idx],
                ),
                text=[
                    f"L{self.layers[i]} H{h}: {float(self.rate[i, h]):.3f} teeth/row"
                    for i, h in idx
                ],
            )
        fig.update_layout(
            title=f"Head span per layer ({self.model}, {self.span.shape[0]} texts); "
            f"diamonds: sawtooth heads (>= {self.min_rate} teeth per row)",
            xaxis_title="layer",
            yaxis_title="head span (mean look-back distance, tokens)",
        )
        return fig

    def verdict(self) -> str:
        loc, n_loc = self.share("local")
        glo, n_glo = self.share("global")
        agrees = loc / n_loc > glo / n_glo
        return (
            f"{'agrees' if agrees else 'disagrees'}: sawtooth in {loc}/{n_loc} local vs "
            f"{glo}/{n_glo} global heads"
        )

    def row(self) -> Row:
        loc, n_loc = self.share("local")
        glo, n_glo = self.share("global")
        every, n_all = self.share(None)
        local_layers = sorted({self.layers[i] for i, _ in self.groups["local"].nonzero().tolist()})
        span = self.mean_span
        return Row(
            finding="Local vs global heads; sawtooth of local heads (Li et al. 2025, section 3)",
            published="Locally focused heads draw a sawtooth near the diagonal (phrasal chunks); "
            "globally focused heads attend to tokens of broad later influence (qualitative, "
            "shown on Qwen heads)",
            measured=f"head span {float(span.min()):.1f}-{float(span.max()):.1f} tokens (median "
            f"{float(span.median()):.1f}); local heads in layers {local_layers}; sawtooth in "
            f"{loc}/{n_loc} local heads vs {glo}/{n_glo} global heads ({every}/{n_all} overall)",
            how=f"{self.model}, {self.span.shape[0]} English paragraphs ({min(self.n_tokens)}-"
            f"{max(self.n_tokens)} tokens); head span = trace.head_span() over all rows, groups = "
            f"bottom / top {self.fraction:.0%}; attention rebuilt from kept q/k; tooth = the most "
            f"attended non-first key held for >= {self.min_rise + 1} rows (distance +1 per row, "
            f"at most {self.max_width} back) then left for a nearer one; sawtooth head = >= {self.min_rate} teeth per row",
        )


@torch.no_grad()
def measure_heads(
    lm: LoadedModel,
    n_samples: int = 16,
    max_tokens: int = 128,
    *,
    fraction: float = 0.3,
    min_rise: int = MIN_RISE,
    max_width: int = MAX_WIDTH,
    min_rate: float = MIN_RATE,
    progress: bool = True,
) -> HeadsResult:
    """Head spans and sawtooth teeth of every head on the first ``n_samples`` English paragraphs
    (each cut to ``max_tokens`` tokens)."""
    if lm.kind != "causal-lm":
        raise AttnscopeError(f"head spans here need a causal LM; {lm.name!r} is a {lm.kind} model")
    start = time.perf_counter()
    spans, teeth, lengths = [], None, []
    for text in tqdm(
        take(english_paragraphs(), n_samples, "English paragraphs"),
        desc="heads",
        unit="text",
        disable=not progress,
    ):
        ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens].to(lm.model.device)
        with capture(lm.model, metrics=("mean_distance",), keep_qk=True) as cap:
            lm.model(input_ids=ids, logits_to_keep=1)
        trace = cap.trace
        spans.append(trace.head_span())
        found = trace_teeth(trace, min_rise, max_width)
        teeth = found if teeth is None else teeth + found
        lengths.append(len(trace))
    return HeadsResult(
        model=lm.name,
        layers=trace.layers,
        span=torch.stack(spans),
        teeth=teeth,
        rows=sum(n - 1 for n in lengths),
        fraction=fraction,
        min_rise=min_rise,
        max_width=max_width,
        min_rate=min_rate,
        n_tokens=lengths,
        seconds=time.perf_counter() - start,
    )
