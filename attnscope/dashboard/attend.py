"""Where a token attends: exact attention rows of a run, per head, per layer and over the
layer x head grid, from the run's kept queries and keys (``patterns.attention_rows``, O(T) per
row) or, for speech runs, from the cross-attention maps the run stores.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from attnscope import patterns
from attnscope.dashboard.data import attention_window, check_position, layer_index, load_run
from attnscope.errors import AttnscopeError
from attnscope.kernels.table import CAUSAL_ONLY
from attnscope.store import RunStore
from attnscope.trace import Trace

SPEECH_MAPS = "maps.safetensors"  # speech runs: cross_attention [L, H, T, F] (speech/run.py)
SPEECH_SUMMARY = "speech.json"
TOP_KEYS = 5  # keys listed per head in the where-it-attends grid
THUMB_SCORES = 2**18  # scores per head-overview thumbnail (beyond it, query rows are sampled)


def hidden_metrics(trace: Trace) -> tuple[str, ...]:
    """Metrics the views leave out: causal-only ones unless the attention is causal."""
    return () if patterns.attention_kind(trace) == "causal" else CAUSAL_ONLY


def speech_maps(store: RunStore, name: str) -> Path | None:
    """The stored cross-attention maps of a speech run, None for other runs."""
    path = store.path_of(name) / SPEECH_MAPS
    return path if path.is_file() else None


def row_layers(store: RunStore, name: str) -> list[int]:
    """Layers whose attention rows can be rebuilt: kept q/k, or every layer of a speech run."""
    trace = load_run(store, name)
    return list(trace.layers) if speech_maps(store, name) else sorted(trace.qk)


def kept(trace: Trace) -> list[int]:
    """Layers with kept queries/keys; none when the run's file of them cannot be read."""
    try:
        return sorted(trace.qk)
    except AttnscopeError:
        return []


def keep_more(trace: Trace, layer: int | None = None) -> str:
    """What to say when a layer has no kept queries/keys: which were kept, how to keep more."""
    kept_layers = kept(trace)
    which = (
        f"queries/keys kept for layers {kept_layers}"
        if kept_layers
        else "this run kept no queries/keys"
    )
    if layer is not None:
        which = f"layer {layer} has no kept queries/keys ({which})"
    if trace.meta.get("qk_note"):
        which += f" ({trace.meta['qk_note']})"
    return (
        f"{which}; rerun with `attnscope analyze ... --keep-qk all` (or a range such as "
        "`--keep-qk 0:6`) to see where tokens attend in more layers"
    )


def attention_rows(
    store: RunStore, name: str, layer: int, positions: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Every head's attention of the queries at ``positions`` in ``layer``, ``[H, r, Tk]``, and
    the keys each query may see, bool ``[r, Tk]`` (keys: tokens, or audio frames for speech)."""
    trace = load_run(store, name)
    for p in positions:
        check_position(trace, p)
    maps = speech_maps(store, name)
    if maps is not None:
        rows = _speech_layer(maps, maps.stat().st_mtime_ns, layer_index(trace, layer))
        rows = rows[:, list(positions)]
        return rows, torch.ones(rows.shape[1:], dtype=torch.bool)
    if layer not in trace.qk:
        raise AttnscopeError(keep_more(trace, layer))
    return patterns.attention_rows(trace, layer, list(positions))


@lru_cache(maxsize=4)
def _speech_layer(path: Path, stamp: int, li: int) -> Tensor:
    """``[H, T, F]`` cross-attention of one layer of a speech run's maps file."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_slice("cross_attention")[li : li + 1][0].float()


def key_labels(store: RunStore, name: str) -> list[str] | None:
    """Labels of the keys when they are not the run's tokens (speech: frame times), else None."""
    maps = speech_maps(store, name)
    if maps is None:
        return None
    frames = _speech_layer(maps, maps.stat().st_mtime_ns, 0).shape[-1]
    seconds = frame_seconds(store, name)
    return [f"frame {f} ({f * seconds:.2f} s)" for f in range(frames)]


def frame_seconds(store: RunStore, name: str) -> float:
    """Seconds per encoder frame of a speech run (Whisper: 0.02)."""
    summary = json.loads((store.path_of(name) / SPEECH_SUMMARY).read_text())["meta"]
    return float(summary["audio_seconds"]) / float(summary["audio_frames"])


@dataclass(frozen=True)
class Destinations:
    """Where one token's attention goes in every layer and head."""

    position: int
    layers: list[int]  # every layer of the run; rows of layers without kept q/k are NaN
    missing: list[int]  # layers without kept q/k
    top_keys: Tensor  # [L, H, k] long, -1 where missing
    top_mass: Tensor  # [L, H, k]
    span_mass: dict[str, Tensor]  # span name -> [L, H] attention on its keys


def destinations(store: RunStore, name: str, position: int, k: int = TOP_KEYS) -> Destinations:
    """The top keys of ``position`` and its mass on each span (and on the first key, where
    sinks form) for every layer and head whose rows can be rebuilt."""
    trace = load_run(store, name)
    check_position(trace, position)
    kept = set(row_layers(store, name))
    n_l, n_h = len(trace.layers), trace.n_heads
    top_keys = torch.full((n_l, n_h, k), -1, dtype=torch.long)
    top_mass = torch.full((n_l, n_h, k), float("nan"))
    spans = {} if speech_maps(store, name) else {"first token": (0, 1), **trace.spans}
    span_mass = {s: torch.full((n_l, n_h), float("nan")) for s in spans}
    for li, layer in enumerate(trace.layers):
        if layer not in kept:
            continue
        rows = attention_rows(store, name, layer, [position])[0][:, 0]  # [H, Tk]
        mass, keys = rows.topk(min(k, rows.shape[-1]), dim=-1)
        keys[mass <= 0] = -1  # masked keys are not destinations
        mass[mass <= 0] = float("nan")
        top_keys[li, :, : keys.shape[1]], top_mass[li, :, : keys.shape[1]] = keys, mass
        for s, (start, end) in spans.items():
            span_mass[s][li] = rows[:, start:end].sum(-1)
    missing = [layer for layer in trace.layers if layer not in kept]
    return Destinations(position, list(trace.layers), missing, top_keys, top_mass, span_mass)


def speech_features(store: RunStore, name: str) -> Tensor | None:
    """``[mel bins, mel frames]`` log-mel features of a speech run's audio, None for others."""
    maps = speech_maps(store, name)
    if maps is None:
        return None
    with safe_open(str(maps), framework="pt") as f:
        return f.get_tensor("features").float()


def thumbnails(
    store: RunStore, name: str, start: int | None, size: int | None, side: int
) -> tuple[dict[tuple[int, int], Tensor], list[int]]:
    """Every head's pattern over a window, pooled to at most ``side x side`` blocks (masked
    blocks NaN), for the layers whose rows can be rebuilt: ``{(layer, head): [r, c]}``, layers.
    Long windows are estimated from a few query rows per block (``data.attention_window``)."""
    trace = load_run(store, name)
    layers = row_layers(store, name)
    maps = speech_maps(store, name)
    out = {}
    for layer in layers:
        if maps is not None:  # tokens x frames, pooled along the frames
            rows = _speech_layer(maps, maps.stat().st_mtime_ns, layer_index(trace, layer))
            pooled = torch.nn.functional.adaptive_avg_pool2d(
                rows, (min(side, rows.shape[1]), min(side, rows.shape[2]))
            )
            out.update({(layer, h): pooled[h] for h in range(len(pooled))})
            continue
        for h in range(trace.n_heads):
            window = attention_window(
                store, name, layer, h, start, size, max_cells=side, budget=THUMB_SCORES
            )
            out[(layer, h)] = window.matrix.masked_fill(window.masked(), float("nan"))
    return out, layers
