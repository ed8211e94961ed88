"""Dense reference metrics (METRICS.md): the oracle that every fast path is tested against."""

from attnscope.metrics.dense import (
    FAI_HORIZON,
    HEAD_GROUP_FRACTION,
    SINK_EPS,
    WAAD_WINDOW,
    entropy,
    fai,
    head_groups,
    head_span,
    max_attention,
    mean_distance,
    received,
    sink_heads,
    sink_mass,
    sink_score,
    span_mass,
    waad,
)

__all__ = [
    "FAI_HORIZON",
    "HEAD_GROUP_FRACTION",
    "SINK_EPS",
    "WAAD_WINDOW",
    "entropy",
    "fai",
    "head_groups",
    "head_span",
    "max_attention",
    "mean_distance",
    "received",
    "sink_heads",
    "sink_mass",
    "sink_score",
    "span_mass",
    "waad",
]
