"""The metric table: one row per statistic, what it is per (row or column) and its definition.

Backends declare which rows they serve (``attnscope.kernels.backends``); ``span_mass:NAME`` stands
for one row metric per named span, and ``sink_logit_mass`` exists only for attention calls with
learned sink logits (gpt-oss). Full definitions: docs/METRICS.md.
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
        Metric("mean_distance", "row", "sum_s A[t,s] (t - s)"),
        Metric("waad", "row", "sum_s A[t,s] min(t - s, W), W = window"),
        Metric("sink_mass", "row", "attention on the first sink_tokens positions"),
        Metric("max_attention", "row", "max_s A[t,s]"),
        Metric("sink_logit_mass", "row", "exp(sink_h - lse_t): the learned sink's probability"),
        Metric("span_mass", "row", "attention on the positions of a named span [start, end)"),
        Metric("received", "col", "sum_t A[t,s] over valid rows"),
        Metric("fai", "col", "mean A[t,s] over rows t with lo <= t - s <= hi (fai_rows only)"),
        Metric("sink_score", "col", "mean A[t,s] over the rows that can see key s"),
    )
}
SINK_METRICS = ("sink_logit_mass",)  # only for calls with learned sinks
# defined over later rows only: meaningless for bidirectional (encoder) and cross-attention
CAUSAL_ONLY = ("fai",)
ROW_METRICS = tuple(
    n for n, m in METRICS.items() if m.axis == "row" and n not in ("span_mass", *SINK_METRICS)
)
COL_METRICS = tuple(n for n, m in METRICS.items() if m.axis == "col")


def base_name(metric: str) -> str:
    """``span_mass:prompt`` -> ``span_mass``; other names as they are."""
    return "span_mass" if metric.startswith(SPAN_PREFIX) else metric


def known_metrics(span_names: tuple[str, ...] = (), sinks: bool = True) -> tuple[str, ...]:
    """Every metric a request may name given its spans and whether its attention has learned
    sinks, in table order (``metrics=None``: all of them)."""
    sink = SINK_METRICS if sinks else ()
    return ROW_METRICS + sink + tuple(SPAN_PREFIX + n for n in span_names) + COL_METRICS


def axis_of(metric: str) -> str:
    """``row`` or ``col`` for a known metric name (``span_mass:NAME`` included)."""
    return METRICS[base_name(metric)].axis
