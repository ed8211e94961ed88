"""Dense backend: materialise the attention probabilities and call the reference metrics.

Memory O(B Hq Tq Tk): for small inputs and as the oracle of the other backends. Computes in
``req.compute_dtype`` (float32, float64 for float64 inputs); checked against tests/independent.py.
"""

from __future__ import annotations

import torch

from attnscope import metrics
from attnscope.kernels.request import StatsRequest
from attnscope.kernels.stats import AttentionStats
from attnscope.kernels.table import SPAN_PREFIX
from attnscope.metrics.dense import analysed_rows, fai_selection


def dense_stats(req: StatsRequest) -> AttentionStats:
    rows_all = slice(None)
    allowed = req.allowed(rows_all)  # [B, 1|Hq, Tq, Tk]
    scores = req.scores(rows_all).masked_fill(~allowed, float("-inf"))  # [B, Hq, Tq, Tk]
    if req.sinks is None:
        attn = torch.softmax(scores, -1)  # NaN rows where everything is masked
        return probability_stats(req, attn, allowed, torch.logsumexp(scores, -1))
    lse = req.with_sink(torch.logsumexp(scores, -1))  # [B, Hq, Tq], sink included
    attn = torch.exp(scores - lse[..., None])  # rows sum to 1 - sink; NaN where all masked
    return probability_stats(req, attn, allowed, lse, req.sink_probability(lse))


def probability_stats(
    req: StatsRequest,
    attn: torch.Tensor,
    allowed: torch.Tensor,
    lse: torch.Tensor,
    sink: torch.Tensor | None = None,
) -> AttentionStats:
    """Statistics of given probabilities ``attn`` ``[B, Hq, Tq, Tk]`` (``req`` supplies positions
    and parameters; its q and k are not read). ``lse`` ``[B, Hq, Tq]`` is passed through.
    ``sink`` ``[B, Hq, Tq]``: a learned sink's probability per row (``attn`` rows then sum to
    ``1 - sink``); needed for ``sink_logit_mass`` and in the entropy."""
    qp, kp = req.q_pos[:, None, :], req.k_pos[:, None, :]  # [B, 1, T]
    valid = ~torch.isnan(attn).any(-1)  # [B, Hq, Tq]

    rows: dict[str, torch.Tensor] = {}
    for name in req.row_metrics:
        if name == "entropy":
            rows[name] = metrics.entropy(attn, sink)
        elif name == "sink_logit_mass":
            assert sink is not None  # build_request refuses the metric without sinks
            rows[name] = sink
        elif name == "mean_distance":
            rows[name] = metrics.mean_distance(attn, qp, kp)
        elif name == "waad":
            rows[name] = metrics.waad(attn, req.window, qp, kp)
        elif name == "sink_mass":
            rows[name] = metrics.sink_mass(attn, req.sink_tokens, kp)
        elif name == "max_attention":
            rows[name] = metrics.max_attention(attn)
        else:
            start, end = req.spans[name.removeprefix(SPAN_PREFIX)]
            rows[name] = metrics.span_mass(attn, start, end, kp)

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    if req.wants("received"):
        sums["received"] = metrics.received(attn)
    if req.wants("fai"):
        sel = fai_selection(qp[..., :, None] - kp[..., None, :], req.fai_horizon)
        sel = sel & analysed_rows(valid, qp, req.fai_rows)[..., :, None]  # [B, Hq, Tq, Tk]
        counts["fai"] = sel.sum(-2).float()
        mean = metrics.fai(attn, req.fai_horizon, req.fai_rows, qp, kp)
        sums["fai"] = torch.nan_to_num(mean) * counts["fai"]
    if req.wants("sink_score"):
        visible = allowed & valid[..., :, None]
        counts["sink_score"] = visible.sum(-2).float()
        mean = metrics.sink_score(attn, mask=allowed)
        sums["sink_score"] = torch.nan_to_num(mean) * counts["sink_score"]
    return AttentionStats(rows, sums, counts, lse, backend="dense")
