"""Backends of ``attention_stats`` and what each can serve; ``auto`` picks the fastest that can.

Every backend declares its capabilities (devices, dtypes, metrics, masks, score biases, spans,
learned sinks). Every backend serves the head metrics (``HEAD_METRICS``): they are computed after it
from single weights and its log-normaliser (``attnscope.kernels.lookups``), so ``choose`` sees the
request without them (``lookups.backend_request``).
``choose`` returns the backend for a request with the reason, recorded in the trace: ``auto``
takes the first backend of ``AUTO_ORDER`` that is fast on the request's device and lacks nothing;
an explicit backend that lacks something fails with an error naming what.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnscope.errors import UnsupportedMetricError
from attnscope.kernels.chunked import chunked_stats
from attnscope.kernels.dense import dense_stats
from attnscope.kernels.request import StatsRequest
from attnscope.kernels.stats import AttentionStats
from attnscope.kernels.table import METRICS, base_name

FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
ALL_METRICS = frozenset(METRICS)


@dataclass(frozen=True)
class Capabilities:
    devices: frozenset[str]  # device types it runs on ("cpu", "cuda", ...); empty: any
    fast_on: frozenset[str]  # device types on which ``auto`` may pick it
    dtypes: frozenset[torch.dtype] = FLOATS
    metrics: frozenset[str] = ALL_METRICS  # base names (span_mass for every span; HEAD_METRICS)
    score_bias: bool = True  # additive float masks (interventions)
    max_spans: int | None = None
    sinks: bool = True  # learned per-head sink logits in the softmax denominator (gpt-oss)


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable[[StatsRequest], AttentionStats]
    capabilities: Capabilities
    summary: str

    def lacks(self, req: StatsRequest) -> list[str]:
        """The parts of ``req`` this backend cannot serve (empty: it serves all of it)."""
        caps, missing = self.capabilities, []
        device = device_type(req.q)
        if caps.devices and device not in caps.devices:
            missing.append(f"device {device} (runs on {', '.join(sorted(caps.devices))})")
        if req.q.dtype not in caps.dtypes or req.k.dtype not in caps.dtypes:
            missing.append(f"dtype {req.q.dtype}")
        unserved = sorted({base_name(m) for m in req.metrics} - caps.metrics)
        if unserved:
            missing.append(f"metric(s) {unserved}")
        if req.bias is not None and not caps.score_bias:
            missing.append("additive score bias (interventions)")
        if caps.max_spans is not None and len(req.spans) > caps.max_spans:
            missing.append(f"more than {caps.max_spans} spans ({len(req.spans)} given)")
        if req.sinks is not None and not caps.sinks:
            missing.append("learned sinks")
        return missing


def device_type(t: torch.Tensor) -> str:
    """The device type a request runs on (one place, so tests can pretend to be on CUDA)."""
    return t.device.type


BACKENDS: dict[str, Backend] = {
    "dense": Backend(
        "dense",
        dense_stats,
        Capabilities(devices=frozenset(), fast_on=frozenset()),
        "materialises the probabilities, memory O(Tq x Tk): small inputs and checks",
    ),
    "chunked": Backend(
        "chunked",
        chunked_stats,
        Capabilities(devices=frozenset(), fast_on=frozenset({"cpu", "cuda", "mps", "xpu"})),
        "PyTorch over query blocks, exact, memory O(block x Tk)",
    ),
}
try:  # the fused GPU kernels need triton (Linux; CUDA, or TRITON_INTERPRET=1 on the CPU)
    from attnscope.kernels.triton_stats import INTERPRET, MAX_SPANS, triton_stats

    BACKENDS["triton"] = Backend(
        "triton",
        triton_stats,
        Capabilities(
            devices=frozenset({"cuda", "cpu"} if INTERPRET else {"cuda"}),
            fast_on=frozenset({"cuda"}),
            dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
            score_bias=False,
            max_spans=MAX_SPANS,
        ),
        "fused Triton kernels, memory O(Tq + Tk)",
    )
except ImportError:
    pass
AUTO_ORDER = ("triton", "chunked")  # fastest first


def choose(req: StatsRequest, backend: str = "auto") -> tuple[Backend, str]:
    """The backend that computes ``req`` and why. Raises ``UnsupportedMetricError`` for an
    unknown backend or an explicit one that cannot serve the request."""
    if backend == "auto":
        passed = []
        for name in AUTO_ORDER:
            candidate = BACKENDS.get(name)
            if candidate is None:
                passed.append(f"{name} not installed")
                continue
            if device_type(req.q) not in candidate.capabilities.fast_on:
                passed.append(f"{name} not fast on {device_type(req.q)}")
                continue
            missing = candidate.lacks(req)
            if missing:
                passed.append(f"{name} cannot serve {'; '.join(missing)}")
                continue
            why = f" ({', '.join(passed)})" if passed else ""
            return candidate, f"auto: {name}, the fastest that serves the request{why}"
        raise UnsupportedMetricError(f"no backend serves this request: {'; '.join(passed)}")
    chosen = BACKENDS.get(backend)
    if chosen is None:
        raise UnsupportedMetricError(
            f"unknown backend {backend!r}; available: {['auto', *BACKENDS]}"
        )
    missing = chosen.lacks(req)
    if missing:
        raise UnsupportedMetricError(
            f"the {backend} backend cannot serve this request: {'; '.join(missing)}. "
            "Use backend='auto' (or 'chunked', which serves every request)"
        )
    return chosen, f"asked for {backend}"
