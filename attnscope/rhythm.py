"""Preplan and anchor tokens of a generation (METRICS.md, reasoning rhythm): the detection.

From a Trace of a generation: local heads' WAAD and global heads' FAI over the response, on
layers sampled from the middle third of the model; then preplan tokens (large WAAD jumps), anchor
tokens (high FAI), locally dominated anchors and their intro tokens. ``attnscope.rl.credit`` turns
these into credit multipliers; ``attnscope.findings.rhythm`` reproduces the paper's measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnscope import metrics
from attnscope.errors import AttnscopeError
from attnscope.trace import Trace


@dataclass(frozen=True)
class RhythmConfig:
    n_layers: int = 5  # layers sampled evenly from the middle third
    group_fraction: float = 0.3  # bottom / top share of heads by head span: local / global
    quantile: float = 0.4  # share of the response marked preplan (by delta) / anchor (by FAI)
    k: int = 3  # look-back for the intro token of a dominated anchor
    tau_waad: float | None = None  # default: response median of WAAD
    tau_delta: float | None = None  # default: response median of delta


@dataclass
class Rhythm:
    """Per response token (length R): signals and token sets."""

    waad: Tensor  # [R] local-head mean WAAD
    fai: Tensor  # [R] global-head mean FAI (NaN where no row is in the horizon)
    entropy: Tensor  # [R] mean entropy over the sampled layers' heads
    delta: Tensor  # [R] |WAAD_t - WAAD_{t+1}|, 0 for the last token
    preplan: Tensor  # [R] bool, T_loc
    anchor: Tensor  # [R] bool, T_glob
    dominated: Tensor  # [R] bool, D
    intro: Tensor  # [R] bool, intro(D)
    layers: list[int]


def sample_layers(n_layers: int, count: int) -> list[int]:
    """``count`` layer indices spread evenly over the middle third of ``n_layers``."""
    lo, hi = n_layers // 3, max(n_layers // 3 + 1, -(-2 * n_layers // 3))
    steps = torch.linspace(lo, hi - 1, max(1, min(count, hi - lo))).tolist()
    return sorted({round(x) for x in steps})


def top_fraction(values: Tensor, fraction: float) -> Tensor:
    """Bool mask of the ``round(fraction * n)`` largest values (NaN never selected). [n]."""
    n = values.numel()
    count = min(round(fraction * n), int((~values.isnan()).sum()))
    mask = torch.zeros(n, dtype=torch.bool)
    if count > 0:
        mask[
            torch.argsort(values.nan_to_num(float("-inf")), descending=True, stable=True)[:count]
        ] = True
    return mask


def rhythm(trace: Trace, config: RhythmConfig = RhythmConfig()) -> Rhythm:
    """Signals and token sets of the trace's response span."""
    if "response" not in trace.spans:
        raise AttnscopeError("the trace has no 'response' span: analyse with generate=N")
    for needed in ("waad", "mean_distance", "entropy"):
        if needed not in trace.rows:
            raise AttnscopeError(f"the rhythm needs the row metric {needed!r} in the trace")
    if "fai" not in trace.cols:
        raise AttnscopeError("the rhythm needs the column metric 'fai' in the trace")
    r0, r1 = trace.spans["response"]
    depth = trace.meta.get("n_model_layers") or max(trace.layers) + 1
    chosen = [
        trace.layers.index(i) for i in sample_layers(depth, config.n_layers) if i in trace.layers
    ]
    if not chosen:
        raise AttnscopeError(
            f"the trace holds none of the middle-third layers (has {trace.layers})"
        )
    span = trace.head_span("response")[chosen]  # [l, H]
    groups = metrics.head_groups(span, config.group_fraction)
    waad = trace.rows["waad"][chosen][groups["local"]][:, r0:r1].mean(0)  # [R]
    fai = trace.cols["fai"][chosen][groups["global"]][:, r0:r1].mean(0)  # [R]
    entropy = trace.rows["entropy"][chosen].flatten(0, 1)[:, r0:r1].mean(0)  # [R]
    return token_sets(waad, fai, entropy, config, [trace.layers[i] for i in chosen])


def token_sets(
    waad: Tensor,
    fai: Tensor,
    entropy: Tensor,
    config: RhythmConfig,
    layers: list[int] | None = None,
) -> Rhythm:
    """Preplan, anchor, dominated and intro tokens from response signals [R] (METRICS.md)."""
    delta = torch.zeros_like(waad)
    delta[:-1] = (waad[:-1] - waad[1:]).abs()
    preplan = top_fraction(delta, config.quantile)
    anchor = top_fraction(fai, config.quantile)
    tau_waad = waad.median() if config.tau_waad is None else torch.tensor(config.tau_waad)
    tau_delta = delta.median() if config.tau_delta is None else torch.tensor(config.tau_delta)
    dominated = torch.zeros_like(anchor)
    intro = torch.zeros_like(anchor)
    for t in torch.nonzero(anchor).flatten().tolist():
        if t == 0 or waad[t] > tau_waad:
            continue
        window = delta[max(0, t - config.k) : t]
        if window.max() >= tau_delta:
            dominated[t] = True
            intro[max(0, t - config.k) + int(torch.argmax(window))] = True
    return Rhythm(waad, fai, entropy, delta, preplan, anchor, dominated, intro, layers or [])
