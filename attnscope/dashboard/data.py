"""What the explorer shows, computed from one run at a time (RunStore + Trace, no Dash).

Runs are read on demand and kept in small LRU caches keyed by path and ``trace.json``
modification time, so a run replaced on disk is read again and a corpus is never loaded whole.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnscope.errors import AttnscopeError
from attnscope.headgrid import trace_scores
from attnscope.kernels.tiles import attention_tile, row_probabilities
from attnscope.store import RunInfo, RunStore
from attnscope.trace import TRACE_FILE, Trace

MAX_CELLS = 256  # the heatmap is pooled to at most MAX_CELLS x MAX_CELLS blocks
SCORE_BUDGET = 2**24  # scores (rows x keys) computed per heatmap view; beyond it rows are sampled
CHUNK_SCORES = 2**23  # scores held at once while computing a heatmap
ALL_LAYERS = "all"
ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])/(?:[^\s/'\"]+/)+[^\s/'\",;:)]*")  # /a/b, /a/b/


def fmt(value: float) -> str:
    """The one number format of the explorer (tables, titles, tests)."""
    return f"{value:.4f}"


def error_text(err: Exception) -> str:
    """A message for the page: attnscope errors speak for themselves, others name their type."""
    return str(err) if isinstance(err, AttnscopeError) else f"{type(err).__name__}: {err}"


def page_text(store: RunStore, text: str) -> str:
    """``text`` as the page shows it (maybe to other machines): paths under the runs root
    relative to it, any other absolute path hidden."""
    root = str(store.root)
    text = text.replace(root + "/", "")
    text = re.sub(re.escape(root) + r"(?![\w.-])", "the runs root", text)
    return ABSOLUTE_PATH.sub("<a path outside the runs root>", text)


def list_runs(store: RunStore) -> list[RunInfo]:
    """The store's readable runs (the others are in ``store.skipped``); an unreadable root
    becomes an error naming it."""
    try:
        return store.runs()
    except (OSError, ValueError, KeyError) as err:
        raise AttnscopeError(f"cannot list the runs under {store.root}: {error_text(err)}") from err


def skipped_lines(store: RunStore) -> list[str]:
    """One line per run the last listing skipped, with why."""
    return [f"skipped run {name!r}: {why}" for name, why in store.skipped.items()]


def first_readable(store: RunStore, runs: list[RunInfo]) -> str | None:
    """The first of ``runs`` that loads: the page opens on it."""
    for info in runs:
        try:
            load_run(store, info.name)
        except Exception:  # any failure: the run shows its error only when picked
            continue
        return info.name
    return None


def empty_root_message(store: RunStore) -> str:
    """What the page says when the root holds no readable run (call after ``list_runs``)."""
    root = store.root.name
    if store.skipped:
        return f"No readable runs under {root}/: the {len(store.skipped)} there are listed above."
    return (
        f"No runs under {root}/. Write one with: attnscope analyze --model gemma3-270m "
        f"--generate 64 --keep-qk all --out {root}/demo"
    )


# -- reading runs ----------------------------------------------------------------------------
def load_run(store: RunStore, name: str) -> Trace:
    """The run ``name`` (confined to the store's root by ``path_of``), cached."""
    path = store.path_of(name)
    return _read_trace(path, _stamp(path))


def load_qk(store: RunStore, name: str, layer: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``Trace.layer_qk`` of the run ``name``: stored queries ``[Hq, T, D]``, keys
    ``[Hkv, Tk, D]`` and attention parameters of one layer, cached."""
    path = store.path_of(name)
    return _read_qk(path, _stamp(path), layer)


def _stamp(path: Path) -> int:
    return (path / TRACE_FILE).stat().st_mtime_ns


def load_scores(store: RunStore, name: str) -> dict[str, Tensor]:
    """The head scores of the run ``name`` (``headgrid.trace_scores``: its trace's and those of
    its head table, if any), ``[L, H]`` each, cached."""
    path = store.path_of(name)
    return _read_scores(path, _stamp(path))


@lru_cache(maxsize=4)
def _read_trace(path: Path, stamp: int) -> Trace:
    return Trace.load(path)


@lru_cache(maxsize=4)
def _read_scores(path: Path, stamp: int) -> dict[str, Tensor]:
    return trace_scores(_read_trace(path, stamp), path)


@lru_cache(maxsize=2)
def _read_qk(path: Path, stamp: int, layer: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
    q, k, params = _read_trace(path, stamp).layer_qk(layer)
    return q.float(), k.float(), params  # kept as fp16 on disk


def clear_caches() -> None:
    _read_trace.cache_clear()
    _read_scores.cache_clear()
    _read_qk.cache_clear()


# -- per-token and per-layer values ----------------------------------------------------------
def metric_values(trace: Trace, metric: str) -> Tensor:
    """``[n_layers, n_heads, T]`` values of a row or column metric."""
    for table in (trace.rows, trace.cols):
        if metric in table:
            return table[metric]
    raise AttnscopeError(f"this run has no metric {metric!r}; it has {[*trace.rows, *trace.cols]}")


def layer_index(trace: Trace, layer: int) -> int:
    if layer not in trace.layers:
        raise AttnscopeError(f"this run has no layer {layer}; it has layers {trace.layers}")
    return trace.layers.index(layer)


def token_values(trace: Trace, metric: str, layer: int | str = ALL_LAYERS) -> Tensor:
    """``[T]``: the metric averaged over heads and over one layer or all (NaN-aware)."""
    values = metric_values(trace, metric)
    if layer != ALL_LAYERS:
        values = values[layer_index(trace, int(layer))][None]
    return torch.nanmean(values.flatten(0, 1), dim=0)


def layer_means(trace: Trace, metric: str) -> Tensor:
    """``[n_layers]``: the metric averaged over heads and tokens of each layer."""
    return torch.nanmean(metric_values(trace, metric).flatten(1), dim=1)


@dataclass(frozen=True)
class TokenRow:
    metric: str
    kind: str  # "row" (per query) or "column" (per key)
    mean: float  # over layers and heads
    max: float
    at: tuple[int, int]  # (layer, head) of the max


def token_summary(trace: Trace, position: int) -> list[TokenRow]:
    """Every metric at one token: mean over layers and heads, and the largest head."""
    check_position(trace, position)
    out = []
    for kind, table in (("row", trace.rows), ("column", trace.cols)):
        for name, values in table.items():
            v = values[..., position]  # [L, H]
            finite = v.nan_to_num(nan=-math.inf)
            li, h = divmod(int(finite.argmax()), trace.n_heads)
            out.append(
                TokenRow(
                    name, kind, float(torch.nanmean(v)), float(v[li, h]), (trace.layers[li], h)
                )
            )
    return out


def check_position(trace: Trace, position: int) -> None:
    if not 0 <= position < len(trace):
        raise AttnscopeError(f"token {position} is outside this run's {len(trace)} tokens")


# -- per-head values ---------------------------------------------------------------------------
def head_tags(trace: Trace) -> list[list[tuple[str, ...]]]:
    """``[L][H]`` tags of each head (``Trace.head_tags``): "local", "global", "sink"."""
    tags = trace.head_tags()
    return [
        [tuple(t for t, m in tags.items() if bool(m[li, h])) for h in range(trace.n_heads)]
        for li in range(len(trace.layers))
    ]


def head_stats(trace: Trace, layer: int, head: int) -> dict[str, float]:
    """The per-head numbers of the head grid for one head."""
    li = layer_index(trace, layer)
    if not 0 <= head < trace.n_heads:
        raise AttnscopeError(f"head {head} outside 0..{trace.n_heads - 1}")
    stats = {}
    if "mean_distance" in trace.rows:
        stats["head span"] = float(trace.head_span()[li, head])
    for name, values in trace.rows.items():
        if name in ("entropy", "max_attention") or name.startswith("span_mass"):
            stats[f"mean {name}"] = float(torch.nanmean(values[li, head]))
    if "sink_score" in trace.cols:
        stats["sink score of token 0"] = float(trace.cols["sink_score"][li, head, 0])
    return stats


# -- attention heatmaps --------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """Block-pooled attention of one head over the tokens ``[start, end)`` (queries and keys)."""

    matrix: Tensor  # [ceil(n/pool), ceil(n/pool)] mean probability per block
    layer: int
    head: int
    start: int
    end: int
    pool: int  # block side in tokens
    sampled_rows: int  # query rows used per block (== pool when exact)
    causal: bool = True
    sliding_window: int | None = None

    @property
    def exact(self) -> bool:
        return self.sampled_rows >= self.pool

    def _blocks(self) -> tuple[Tensor, Tensor]:
        """First and last token of each block, ``[n_blocks]`` each."""
        first = torch.arange(self.start, self.end, self.pool)
        return first, (first + self.pool).clamp(max=self.end) - 1

    def masked(self) -> Tensor:
        """``[rows, cols]`` bool: blocks no query of which may see any key (the future under
        causal attention, beyond the sliding window)."""
        first, last = self._blocks()
        masked = torch.zeros(len(first), len(first), dtype=torch.bool)
        if self.causal:
            masked |= first[None, :] > last[:, None]  # every key after every query
        if self.sliding_window is not None:
            masked |= first[:, None] - last[None, :] >= self.sliding_window
        return masked

    def inside_mass(self) -> Tensor:
        """``[rows]``: each block of queries' mean attention on the window's keys (1 - the
        mass on keys outside the window, and on a learned sink)."""
        first, last = self._blocks()
        return (self.matrix * (last - first + 1)[None, :]).sum(1)


def clamp_window(n_tokens: int, start: int | None, size: int | None) -> tuple[int, int]:
    """``[start, end)`` inside the run, whatever the inputs say."""
    start = min(max(0, int(start or 0)), n_tokens - 1)
    size = min(max(1, int(size or MAX_CELLS)), n_tokens - start)
    return start, start + size


def attention_window(
    store: RunStore,
    name: str,
    layer: int,
    head: int,
    start: int | None,
    size: int | None,
    *,
    max_cells: int = MAX_CELLS,
    budget: int = SCORE_BUDGET,
) -> Window:
    """Attention of ``head`` in ``layer`` over a window of tokens, from the run's stored q/k.

    Exact block means while ``rows x keys`` stays within ``budget`` scores; beyond it, each block
    averages evenly spaced query rows (over all of its keys), so any window of any run costs
    about ``budget`` scores.
    """
    q, k, params = load_qk(store, name, layer)
    if not 0 <= head < q.shape[0]:
        raise AttnscopeError(f"head {head} outside 0..{q.shape[0] - 1}")
    start, end = clamp_window(q.shape[1], start, size)
    if params.get("causal", True):
        k = k[:, :end]  # later keys are invisible to every row of the window
    pool = math.ceil((end - start) / max_cells)
    n_blocks = math.ceil((end - start) / pool)
    rows = min(pool, max(1, budget // (n_blocks * k.shape[1])))
    kwargs = attention_kwargs(params)
    if rows == pool:
        matrix = _exact_blocks(q, k, head, start, end, pool, kwargs)
    else:
        matrix = _sampled_blocks(q, k, head, start, end, pool, rows, kwargs)
    return Window(
        matrix,
        layer,
        head,
        start,
        end,
        pool,
        rows,
        causal=bool(params.get("causal", True)),
        sliding_window=params.get("sliding_window"),
    )


def attention_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """The stored attention parameters of a layer as keywords of ``kernels.tiles``."""
    return {
        key: params[key]
        for key in ("scale", "causal", "sliding_window", "softcap", "sinks")
        if params.get(key) is not None
    }


def _exact_blocks(
    q: Tensor, k: Tensor, head: int, start: int, end: int, pool: int, kwargs: dict
) -> Tensor:
    """Exact pooled tile, computed in bands of whole blocks to bound memory."""
    band = pool * max(1, CHUNK_SCORES // (pool * k.shape[1]))
    return torch.cat(
        [
            attention_tile(q, k, head, (r, min(r + band, end)), (start, end), pool=pool, **kwargs)
            for r in range(start, end, band)
        ]
    )


def _sampled_blocks(
    q: Tensor, k: Tensor, head: int, start: int, end: int, pool: int, rows: int, kwargs: dict
) -> Tensor:
    """Per block of queries, the mean over ``rows`` evenly spaced rows; keys pooled exactly.

    The sampled rows of all blocks go through one request (explicit query positions), so the
    keys are read once per chunk rather than once per block.
    """
    starts = torch.arange(start, end, pool)
    heights = (end - starts).clamp(max=pool)
    m = heights.clamp(max=rows)  # a short last block may have fewer rows than ``rows``
    block = torch.repeat_interleave(torch.arange(len(starts)), m)
    i = torch.arange(len(block)) - torch.repeat_interleave(m.cumsum(0) - m, m)  # index in block
    positions = starts[block] + ((2 * i + 1) * heights[block]) // (2 * m[block])
    chunk = max(1, CHUNK_SCORES // k.shape[1])
    probs = torch.cat(
        [
            row_probabilities(q, k, head, positions[c : c + chunk], **kwargs)[:, start:end]
            for c in range(0, len(block), chunk)
        ]
    )
    padded = torch.cat([probs, probs.new_full((len(probs), -(end - start) % pool), math.nan)], 1)
    pooled = torch.nanmean(padded.view(len(probs), -1, pool), dim=2)  # [picked rows, blocks]
    sums = pooled.new_zeros(len(starts), pooled.shape[1]).index_add_(0, block, pooled)
    return sums / m[:, None]
