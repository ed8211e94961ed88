"""The head table of a trace: one row per (layer, head) with every head score it can give, and a
label (docs/METRICS.md, "Head taxonomy").

Detector scores follow TransformerLens' ``detect_head`` (defaults: BOS and the current token
included): with ``m_t`` the row metric (the weight on the detection pattern's keys of row t) and
``n_t`` the number of those keys,

- ``mul`` (the plain score name): ``sum_t m_t / sum_t sum_s A[t,s]`` = mean over rows of ``m_t``;
- ``abs`` (``NAME_abs``): ``1 - mean_t sum_s |A[t,s] - P[t,s]| = 1 - mean_t (1 + n_t - 2 m_t)``
  (TransformerLens rounds the mean to 3 decimals; this does not).

Other scores: ``lookback`` (mean lookback ratio over the rows that have one), ``receiver``
(excess kurtosis of the head's FAI column, the mean weight a key receives from later rows, over
the keys of the ``response`` span or of the whole trace after its first key, the usual sink:
Bogdan et al. 2025), ``sink`` (first-token sink score) and ``span`` (mean look-back distance).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from attnscope import metrics
from attnscope.errors import AttnscopeError
from attnscope.kernels.lookups import pairs

if TYPE_CHECKING:
    from attnscope.trace import Trace

DETECTORS = ("prev_token", "duplicate_token", "induction")
# a head takes the first label whose score reaches its threshold (mul scores, then the others)
LABELS = (
    ("induction_random", "induction", 0.3),
    ("induction", "induction", 0.3),
    ("prev_token", "previous-token", 0.4),
    ("duplicate_token", "duplicate-token", 0.3),
    ("retrieval", "retrieval", 0.1),
    ("receiver", "receiver", 10.0),
)
# receiver heads are the model's most kurtotic (Bogdan et al. rank heads by kurtosis): a head is
# labelled one only within this top share of its model's heads, and above the threshold
RECEIVER_SHARE = 0.1
# what views call each score, in the order they list them (unknown names follow, as written)
SCORE_TITLES = {
    "induction_random": "induction (random tokens)",
    "induction_random_abs": "induction (random tokens, abs)",
    "induction": "induction",
    "induction_abs": "induction (abs)",
    "prev_token": "previous-token",
    "prev_token_abs": "previous-token (abs)",
    "duplicate_token": "duplicate-token",
    "duplicate_token_abs": "duplicate-token (abs)",
    "retrieval": "retrieval",
    "lookback": "lookback ratio",
    "receiver": "receiver (FAI kurtosis)",
    "sink": "first-token sink",
    "span": "head span",
}


def score_title(name: str) -> str:
    """The readable name of a head score (``SCORE_TITLES``; others with spaces for ``_``)."""
    return SCORE_TITLES.get(name, name.replace("_", " "))


def ordered_scores(scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """``scores`` in the order of ``SCORE_TITLES``, unknown names after them."""
    rank = {name: i for i, name in enumerate(SCORE_TITLES)}
    return dict(sorted(scores.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def pattern_counts(name: str, token_ids: list[int]) -> Tensor:
    """``n_t``: keys of the detection pattern of each row ``[T]`` (float64)."""
    ids = torch.tensor(token_ids, dtype=torch.long)
    rows, _ = pairs(name, torch.arange(len(ids)), ids)
    return torch.bincount(rows, minlength=len(ids)).double()


def detector_scores(row: Tensor, counts: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``mul`` and ``abs`` scores ``[L, H]`` of a detector's row metric ``[L, H, T]`` (NaN rows,
    which see no key, left out); ``abs`` needs the pattern counts ``[T]``."""
    m = row.double()
    mul = torch.nanmean(m, -1)
    if counts is None:
        return mul, None
    return mul, 1 - torch.nanmean(1 + counts - 2 * m, -1)


def excess_kurtosis(x: Tensor) -> Tensor:
    """Fisher's (excess) kurtosis over the last axis, NaN entries left out: ``m4 / m2^2 - 3``."""
    mean = torch.nanmean(x, -1, keepdim=True)
    d = x - mean
    m2 = torch.nanmean(d**2, -1)
    return torch.nanmean(d**4, -1) / m2**2 - 3


def head_scores(trace: Trace) -> dict[str, Tensor]:
    """Every score the trace's metrics give, name -> ``[L, H]`` float64."""
    out: dict[str, Tensor] = {}
    for name in DETECTORS:
        if name not in trace.rows:
            continue
        counts = pattern_counts(name, trace.token_ids) if trace.token_ids else None
        mul, abs_ = detector_scores(trace.rows[name], counts)
        out[name] = mul
        if abs_ is not None:
            out[f"{name}_abs"] = abs_
    if "lookback" in trace.rows:
        out["lookback"] = torch.nanmean(trace.rows["lookback"].double(), -1)
    if "fai" in trace.cols:
        start, end = trace.spans.get("response", (0, len(trace)))
        # key 0, the first-token sink of most heads, would make nearly every head a receiver
        start = max(start, 1)
        out["receiver"] = excess_kurtosis(trace.cols["fai"][..., start:end].double())
    if "sink_score" in trace.cols:
        out["sink"] = trace.cols["sink_score"][..., 0].double()
    if "mean_distance" in trace.rows:
        out["span"] = trace.head_span().double()
    return out


def label_heads(scores: dict[str, Tensor], shape: tuple[int, int]) -> list[str]:
    """One label per head in (layer, head) order: the first of ``LABELS`` whose score reaches
    its threshold (receiver: and within the top ``RECEIVER_SHARE`` of the heads), else ``sink``
    (first-token sink heads), else ``-``."""
    thresholds = {key: threshold for key, _, threshold in LABELS}
    if "receiver" in scores and not bool(scores["receiver"].isnan().all()):
        top = torch.nanquantile(scores["receiver"].double().flatten(), 1 - RECEIVER_SHARE)
        thresholds["receiver"] = max(thresholds["receiver"], float(top))
    sink = (
        metrics.sink_heads(scores["sink"])
        if "sink" in scores
        else torch.zeros(shape, dtype=torch.bool)
    )
    labels = []
    for i in range(shape[0]):
        for h in range(shape[1]):
            label = next(
                (
                    text
                    for key, text, _ in LABELS
                    if key in scores and float(scores[key][i, h]) >= thresholds[key]
                ),
                "sink" if bool(sink[i, h]) else "-",
            )
            labels.append(label)
    return labels


def score_table(layers: list[int], scores: dict[str, Tensor]) -> pa.Table:
    """``layer``, ``head``, each score, ``label``: one row per head."""
    n_l, n_h = next(iter(scores.values())).shape
    columns = {
        "layer": np.repeat(np.asarray(layers, dtype=np.int32), n_h),
        "head": np.tile(np.arange(n_h, dtype=np.int32), n_l),
    }
    for name, value in scores.items():
        columns[name] = value.reshape(-1).numpy()
    columns["label"] = label_heads(scores, (n_l, n_h))
    return pa.table(columns)


def table_scores(table: pa.Table, layers: list[int], n_heads: int) -> dict[str, Tensor]:
    """The scores of a head table (``score_table``, e.g. a run's ``heads.parquet``) as
    ``[L, H]`` float64 each, on ``layers``; heads the table lacks are NaN."""
    index = {layer: i for i, layer in enumerate(layers)}
    missing = set(table["layer"].to_pylist()) - set(index)
    heads = table["head"].to_numpy()
    if missing or (heads >= n_heads).any():
        raise AttnscopeError(
            f"the head table has layers {sorted(missing)} or heads >= {n_heads} that the trace "
            f"(layers {layers}, {n_heads} heads) lacks"
        )
    rows = torch.tensor([index[layer] for layer in table["layer"].to_pylist()], dtype=torch.long)
    cols = torch.from_numpy(heads.astype(np.int64))
    out = {}
    for name in table.column_names:
        if name in ("layer", "head", "label"):
            continue
        values = torch.full((len(layers), n_heads), float("nan"), dtype=torch.float64)
        values[rows, cols] = torch.tensor(table[name].to_numpy(), dtype=torch.float64)
        out[name] = values
    return out


def head_table(trace: Trace) -> pa.Table:
    """The head table of one trace (``Trace.heads``)."""
    scores = head_scores(trace)
    if not scores:
        raise AttnscopeError(
            "the trace holds no metric that gives a head score: capture with metrics such as "
            f"{list(DETECTORS)}, fai, sink_score or mean_distance"
        )
    return score_table(trace.layers, scores)
