"""``StatsConfig``: every parameter of the attention statistics, declared once.

One frozen, validated value travels from the entry point (``analyze``, ``analyze_corpus``,
``capture``, ``capture_lens``, ``attention_stats``, the GRPO trainers) to the backend and into the
trace's metadata, so a run records exactly what it computed. Keyword arguments of those entry
points are shortcuts that override its fields (``StatsConfig.build(config, **overrides)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from attnscope.errors import UnsupportedMetricError
from attnscope.kernels.table import CONTEXT_SPAN, SPAN_PREFIX, known_metrics
from attnscope.metrics.dense import FAI_HORIZON, WAAD_WINDOW, check_horizon

BACKEND_NAMES = ("auto", "dense", "chunked", "triton")
RESPONSE = "response"  # fai_rows: the response span of a generation, resolved by the analysis


@dataclass(frozen=True)
class StatsConfig:
    """What to compute and how. Lists become tuples; every value is checked on construction.

    metrics: names from the metric table (``attnscope.kernels.table``); None = every row and
        column metric plus ``span_mass:NAME`` for each span (head metrics only when named).
    layers: layer indices to capture (None = all); keep_qk: layers whose post-RoPE queries and
        keys are kept (True = all, False = none).
    backend: ``auto`` (fastest backend that can serve the request) | dense | chunked | triton.
    window: WAAD window W; fai_horizon: (lo, hi) or None (all later rows); fai_rows: query
        positions [start, end) that FAI averages over, ``"response"``, or None (all).
    sink_tokens: how many leading tokens count as the sink; spans: name -> [start, end).
    exact_logits: True keeps the model's own attention kernel (bit-identical logits); False lets
        the capture compute each captured layer's output with its statistics in one pass
        (``kernels.fused``; logits within floating-point tolerance of SDPA).
    """

    metrics: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    backend: str = "auto"
    window: int = WAAD_WINDOW
    fai_horizon: tuple[int, int] | None = FAI_HORIZON
    fai_rows: tuple[int, int] | str | None = None
    sink_tokens: int = 1
    spans: tuple[tuple[str, tuple[int, int]], ...] = ()
    keep_qk: tuple[int, ...] | bool = False
    exact_logits: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once
        set_(self, "spans", _spans(self.spans))
        set_(self, "layers", _indices(self.layers, "layers"))
        if not isinstance(self.keep_qk, bool):
            set_(self, "keep_qk", _indices(self.keep_qk, "keep_qk") or False)
        if self.fai_horizon is not None:
            set_(self, "fai_horizon", _pair(self.fai_horizon, "fai_horizon"))
        if self.fai_rows is not None and self.fai_rows != RESPONSE:
            set_(self, "fai_rows", _pair(self.fai_rows, "fai_rows"))
        if self.metrics is not None:
            if isinstance(self.metrics, str):
                raise UnsupportedMetricError(
                    f"metrics must be a list of names, got the string {self.metrics!r}"
                )
            set_(self, "metrics", tuple(dict.fromkeys(self.metrics)))
        self._check()

    def _check(self) -> None:
        if self.backend not in BACKEND_NAMES:
            raise UnsupportedMetricError(
                f"unknown backend {self.backend!r}; available: {list(BACKEND_NAMES)}"
            )
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"WAAD window must be an integer >= 1, got {self.window!r}")
        if not isinstance(self.exact_logits, bool):
            raise ValueError(f"exact_logits must be True or False, got {self.exact_logits!r}")
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an integer >= 0, got {self.sink_tokens!r}")
        check_horizon(self.fai_horizon)
        if isinstance(self.fai_rows, str) and self.fai_rows != RESPONSE:
            raise ValueError(
                f"fai_rows must be (start, end), {RESPONSE!r} or None, got {self.fai_rows!r}"
            )
        if isinstance(self.fai_rows, tuple) and not 0 <= self.fai_rows[0] <= self.fai_rows[1]:
            raise ValueError(f"fai_rows (start, end) needs 0 <= start <= end, got {self.fai_rows}")
        for name, (start, end) in self.spans:
            if end < start:
                raise ValueError(f"span {name!r} has end {end} < start {start}")
        if self.metrics is not None:
            known = known_metrics(self.span_names, heads=True)
            unknown = [m for m in self.metrics if m not in known]
            if unknown:
                raise UnsupportedMetricError(
                    f"unknown metric(s) {unknown}; available: {sorted(known)} "
                    f"({SPAN_PREFIX}NAME needs spans={{NAME: (start, end)}})"
                )
            context = self.span_dict.get(CONTEXT_SPAN)
            if "lookback" in self.metrics and (context is None or context[0] != 0):
                raise UnsupportedMetricError(
                    f"lookback needs the context as a span {CONTEXT_SPAN!r} = (0, N) (N context "
                    f"tokens), got {context}: add spans={{{CONTEXT_SPAN!r}: (0, n_prompt)}}"
                )

    # -- views ------------------------------------------------------------------------------------
    @property
    def span_dict(self) -> dict[str, tuple[int, int]]:
        return dict(self.spans)

    @property
    def span_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.spans)

    def wants_layer(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def keeps_qk(self, layer: int) -> bool:
        return self.keep_qk is True or (bool(self.keep_qk) and layer in self.keep_qk)

    # -- building ---------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> StatsConfig:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    @classmethod
    def build(cls, config: StatsConfig | None = None, **overrides: Any) -> StatsConfig:
        """``config`` (default: the defaults) with the given keyword shortcuts applied."""
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(
                f"unknown statistics parameter(s) {sorted(unknown)}; StatsConfig takes "
                f"{[f.name for f in fields(cls)]}"
            )
        if config is not None and not isinstance(config, StatsConfig):
            raise TypeError(f"config must be a StatsConfig, got {type(config).__name__}")
        base = config if config is not None else cls()
        return base.replace(**overrides) if overrides else base

    def resolved(self, n_prompt: int, n_total: int) -> StatsConfig:
        """``fai_rows="response"`` made concrete for a generation: rows ``[n_prompt, n_total)``."""
        if self.fai_rows != RESPONSE:
            return self
        return self.replace(fai_rows=(n_prompt, n_total))

    # -- metadata ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (tuples as lists, spans as a mapping)."""
        out = asdict(self)
        out["spans"] = {name: list(bounds) for name, bounds in self.spans}
        for key in ("metrics", "layers", "fai_horizon", "fai_rows"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        if isinstance(out["keep_qk"], tuple):
            out["keep_qk"] = list(out["keep_qk"])
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StatsConfig:
        """The inverse of ``to_json`` (unknown keys are an error)."""
        return cls(**dict(data))


def _pair(value: Any, name: str) -> tuple[int, int]:
    try:
        lo, hi = value
        return int(lo), int(hi)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a pair (start, end), got {value!r}") from err


def _indices(value: Iterable[int] | None, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list of layer indices, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must hold integer layer indices, got {v!r}")
        out.append(v)
    return tuple(sorted(set(out)))


def _spans(value: Any) -> tuple[tuple[str, tuple[int, int]], ...]:
    items = value.items() if isinstance(value, Mapping) else (value or ())
    out = []
    for entry in items:
        try:
            name, bounds = entry
        except (TypeError, ValueError) as err:
            raise ValueError(f"spans must map names to (start, end), got {entry!r}") from err
        out.append((str(name), _pair(bounds, f"span {name!r}")))
    return tuple(out)
