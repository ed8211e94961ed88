"""The metric table: one row per statistic, what it is per (row or column) and its definition.

Backends declare which rows they serve (``attnscope.kernels.backends``); ``span_mass:NAME`` stands
for one row metric per named span, and ``sink_logit_mass`` exists only for attention calls with
learned sink logits (gpt-oss). Head-detector metrics (``HEAD_METRICS``) are single weights or sums
of a few weights per row, computed after any backend from its log-normaliser
(``attnscope.kernels.lookups``); they are computed only when named. Full definitions:
docs/METRICS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SPAN_PREFIX = "span_mass:"


@dataclass(frozen=True)
class Metric:
    name: str
    axis: Literal["row", "col"]  # row: one value per query; col: one value per key
    definition: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("entropy", "row", "-sum_s A[t,s] log A[t,s] (nats), plus a learned sink's term"),
        Metric("mean_distance", "row", "sum_s A[t,s] |t - s|"),
        Metric("waad", "row", "sum_s A[t,s] min(|t - s|, W), W = window"),
        Metric("sink_mass", "row", "attention on the first sink_tokens positions"),
        Metric("max_attention", "row", "max_s A[t,s]"),
        Metric("sink_logit_mass", "row", "exp(sink_h - lse_t): the learned sink's probability"),
        Metric("span_mass", "row", "attention on the positions of a named span [start, end)"),
        Metric("prev_token", "row", "A[t, t-1]: the previous-token weight (0 at t = 0)"),
        Metric("duplicate_token", "row", "sum_{s < t, x_s = x_t} A[t,s]: earlier copies of x_t"),
        Metric("induction", "row", "sum_{1 <= s <= t, x_{s-1} = x_t} A[t,s]: tokens after copies"),
        Metric(
            "copy_attention",
            "row",
            "max_{s <= t, x_s = x_{t+1}, s in span 'source' if given} A[t,s]; NaN: no such key",
        ),
        Metric(
            "lookback",
            "row",
            "mean A on span 'context' [0, N) / (that + mean A on [N, t]), rows t >= N",
        ),
        Metric("received", "col", "sum_t A[t,s] over valid rows"),
        Metric("fai", "col", "mean A[t,s] over rows t with lo <= t - s <= hi (fai_rows only)"),
        Metric("sink_score", "col", "mean A[t,s] over the rows that can see key s"),
    )
}
SINK_METRICS = ("sink_logit_mass",)  # only for calls with learned sinks
# defined over later rows only: meaningless for bidirectional (encoder) and cross-attention
CAUSAL_ONLY = ("fai",)
# computed from single weights after the backend ran; only when named (they need token ids)
HEAD_METRICS = ("prev_token", "duplicate_token", "induction", "copy_attention", "lookback")
TOKEN_METRICS = ("duplicate_token", "induction", "copy_attention")  # need the token ids
SOURCE_SPAN = "source"  # copy_attention: keys inside this span only, when the config has it
CONTEXT_SPAN = "context"  # lookback: the context [0, N)
ROW_METRICS = tuple(
    n
    for n, m in METRICS.items()
    if m.axis == "row" and n not in ("span_mass", *SINK_METRICS, *HEAD_METRICS)
)
COL_METRICS = tuple(n for n, m in METRICS.items() if m.axis == "col")


def base_name(metric: str) -> str:
    """``span_mass:prompt`` -> ``span_mass``; other names as they are."""
    return "span_mass" if metric.startswith(SPAN_PREFIX) else metric


def known_metrics(
    span_names: tuple[str, ...] = (), sinks: bool = True, heads: bool = False
) -> tuple[str, ...]:
    """The metrics of ``metrics=None`` given a request's spans and whether its attention has
    learned sinks, in table order; ``heads=True`` adds the head metrics (every name a request
    may give)."""
    sink = SINK_METRICS if sinks else ()
    head = HEAD_METRICS if heads else ()
    return ROW_METRICS + sink + head + tuple(SPAN_PREFIX + n for n in span_names) + COL_METRICS


def axis_of(metric: str) -> str:
    """``row`` or ``col`` for a known metric name (``span_mass:NAME`` included)."""
    return METRICS[base_name(metric)].axis
