"""Reference statistics from eager ``output_attentions``, for comparison with captured traces."""

from __future__ import annotations

import torch

from attnscope import metrics
from attnscope.trace import Trace

TOL = 1e-4


@torch.no_grad()
def eager_attentions(model: torch.nn.Module, **inputs) -> list[torch.Tensor]:
    """Per-layer probabilities ``[B, H, T, T]`` from an eager pass; restores the implementation."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    attentions = list(out.attentions)
    n_layers = model.config.get_text_config().num_hidden_layers
    assert len(attentions) == n_layers, f"eager returned {len(attentions)} of {n_layers} layers"
    return attentions


def reference_stats(attn: torch.Tensor, horizon=(10, 100), window=10) -> dict[str, torch.Tensor]:
    """Every metric of a Trace from probabilities ``[L, H, T, T]`` with the dense reference."""
    return {
        "entropy": metrics.entropy(attn),
        "mean_distance": metrics.mean_distance(attn),
        "waad": metrics.waad(attn, window=window),
        "sink_mass": metrics.sink_mass(attn),
        "max_attention": metrics.max_attention(attn),
        "received": metrics.received(attn),
        "fai": metrics.fai(attn, horizon=horizon),
        "sink_score": metrics.sink_score(attn, mask=attn > 0),
    }


def assert_trace_matches(trace: Trace, attn: torch.Tensor, tol: float = TOL, **kwargs) -> None:
    """Every row and column metric of ``trace`` equals the reference from ``attn`` [L, H, T, T]."""
    ref = reference_stats(attn.float(), **kwargs)
    got = {**trace.rows, **trace.cols}
    assert set(ref) <= set(got), f"trace lacks {set(ref) - set(got)}"
    for name, expected in ref.items():
        torch.testing.assert_close(
            got[name],
            expected,
            atol=tol,
            rtol=tol,
            equal_nan=True,
            msg=lambda m, n=name: f"{n}: {m}",
        )
