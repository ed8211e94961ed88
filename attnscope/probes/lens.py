"""TransformerLens (TransformerBridge) probe: reduce ``hook_pattern`` to statistics and drop it.

TransformerBridge computes attention itself (eager), so the full pattern exists for one layer at a
time; the hook turns it into the same statistics as ``capture`` and returns nothing, so no pattern
is cached.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from attnscope.errors import AttnscopeError
from attnscope.kernels.config import StatsConfig
from attnscope.kernels.dense import probability_stats
from attnscope.kernels.request import build_request
from attnscope.trace import Trace


def disable_torchvision_autoinstall() -> None:
    """TransformerLens 4 may silently `pip install torchvision` (which replaces torch with a CUDA
    build) for multimodal directories; turn that off for this process."""
    try:
        from transformer_lens.model_bridge.sources.transformers import helpers
    except ImportError:
        return
    helpers._ensure_torchvision = lambda: False


@torch.no_grad()
def capture_lens(
    bridge: Any,
    input_ids: torch.Tensor,
    metrics: Sequence[str] | None = None,
    layers: Iterable[int] | None = None,
    *,
    config: StatsConfig | None = None,
    tokenizer: Any = None,
    **stats: Any,
) -> Trace:
    """Run ``bridge`` on ``input_ids`` ``[1, T]`` and return the Trace of its attention patterns.

    ``config`` (``StatsConfig``; ``metrics``, ``layers`` and keyword ``stats`` override its
    fields) says what to compute; the patterns are reduced by the dense backend."""
    given = {"metrics": metrics, "layers": layers}
    config = StatsConfig.build(config, **stats, **{k: v for k, v in given.items() if v is not None})
    disable_torchvision_autoinstall()
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise AttnscopeError(
            f"capture_lens takes input_ids of shape [1, T], got {tuple(input_ids.shape)}"
        )
    n_layers = len(bridge.blocks)
    chosen = list(range(n_layers) if config.layers is None else config.layers)
    if any(not 0 <= i < n_layers for i in chosen):
        raise AttnscopeError(f"layers {chosen} outside the model's 0..{n_layers - 1}")
    results: dict[int, Any] = {}

    def reduce(layer: int):
        def hook(pattern: torch.Tensor, hook: Any) -> None:  # pattern [B, H, T, T]
            b, h, t, _ = pattern.shape
            shape_only = torch.zeros(b, h, t, 1)  # positions and parameters only: never read
            req = build_request(shape_only, shape_only, config, scale=1.0)
            allowed = pattern > 0  # what the model let each query see
            results[layer] = probability_stats(
                req, pattern.float(), allowed, torch.full((b, h, t), float("nan"))
            )

        return hook

    hooks = [(f"blocks.{i}.attn.hook_pattern", reduce(i)) for i in chosen]
    bridge.run_with_hooks(input_ids, fwd_hooks=hooks, return_type=None)
    stats = [results[i] for i in chosen]
    ids = input_ids[0].tolist()
    return Trace(
        tokens=tokenizer.convert_ids_to_tokens(ids)
        if tokenizer is not None
        else list(map(str, ids)),
        token_ids=ids,
        spans={},
        layers=chosen,
        n_heads=stats[0].lse.shape[1],
        rows={n: torch.stack([s.rows[n][0] for s in stats]) for n in stats[0].rows},
        cols={n: torch.stack([s.cols[n][0] for s in stats]) for n in stats[0].col_sums},
        meta={
            "model": type(bridge).__name__,
            "backend": "transformer_lens",
            "stats_config": config.to_json(),
            "window": config.window,
            "fai_horizon": config.fai_horizon,
            "sink_tokens": config.sink_tokens,
        },
    )
