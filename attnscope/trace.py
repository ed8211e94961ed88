"""``Trace``: tokens, spans and per-layer, per-head attention statistics of one sequence."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from attnscope import metrics
from attnscope.atomic import write_dir_atomically
from attnscope.errors import AttnscopeError

FORMAT_VERSION = 1
TRACE_FILE = "trace.json"
STATS_FILE = "stats.parquet"
QK_FILE = "qk.safetensors"
INDEX_COLUMNS = ("layer", "head", "position", "token")


@dataclass
class Trace:
    tokens: list[str]
    token_ids: list[int]
    spans: dict[str, tuple[int, int]]  # name -> [start, end) positions
    layers: list[int]
    n_heads: int
    rows: dict[str, Tensor]  # per-query metrics, [n_layers, n_heads, T]
    cols: dict[str, Tensor]  # per-key metrics, [n_layers, n_heads, T]
    meta: dict[str, Any] = field(default_factory=dict)
    # layer -> (q [Hq, T, D], k [Hkv, Tk, D]) post-RoPE, kept only when asked (capture(keep_qk=...));
    # Tk = T, except for cross-attention, whose keys are the encoder positions
    qk: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        for kind, table in (("rows", self.rows), ("cols", self.cols)):
            for name, t in table.items():
                if tuple(t.shape) != (len(self.layers), self.n_heads, n):
                    raise AttnscopeError(
                        f"trace {kind}[{name!r}] has shape {tuple(t.shape)}, expected "
                        f"[n_layers={len(self.layers)}, n_heads={self.n_heads}, T={n}]"
                    )

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return (
            f"Trace(T={len(self)}, layers={len(self.layers)}, heads={self.n_heads}, "
            f"spans={self.spans}, rows={list(self.rows)}, cols={list(self.cols)})"
        )

    # -- per-head summaries ---------------------------------------------------------------
    def head_span(self, span: str | None = None) -> Tensor:
        """Mean look-back distance per head over the rows of ``span`` (all rows if None).

        ``[n_layers, n_heads]``.
        """
        d = self.rows["mean_distance"]
        if span is not None:
            start, end = self.spans[span]
            d = d[..., start:end]
        return torch.nanmean(d, dim=-1)

    def head_groups(self, fraction: float = 0.3, span: str | None = None) -> dict[str, Tensor]:
        """Local (bottom ``fraction`` by head span) and global (top) heads, bool ``[L, H]``."""
        return metrics.head_groups(self.head_span(span), fraction)

    def sink_heads(self, eps: float = metrics.SINK_EPS) -> Tensor:
        """Heads whose first-token sink score exceeds ``eps``, bool ``[L, H]``."""
        return metrics.sink_heads(self.cols["sink_score"][..., 0], eps)

    # -- tables and files -------------------------------------------------------------------
    def to_arrow(self) -> pa.Table:
        """Long table: one row per (layer, head, position) with the token and every metric."""
        n_l, n_h, n = len(self.layers), self.n_heads, len(self.tokens)
        layer = np.repeat(np.asarray(self.layers, dtype=np.int32), n_h * n)
        head = np.tile(np.repeat(np.arange(n_h, dtype=np.int32), n), n_l)
        position = np.tile(np.arange(n, dtype=np.int32), n_l * n_h)
        token = pa.DictionaryArray.from_arrays(
            np.tile(np.arange(n, dtype=np.int32), n_l * n_h), pa.array(self.tokens, pa.string())
        )
        columns: dict[str, Any] = {
            "layer": layer,
            "head": head,
            "position": position,
            "token": token,
        }
        for name, t in {**self.rows, **self.cols}.items():
            values = t.detach().float().cpu().numpy().reshape(-1)
            # undefined values (NaN: e.g. FAI without a horizon) are SQL NULLs, which avg() skips
            columns[name] = pa.array(values, mask=np.isnan(values))
        return pa.table(columns)

    def layer_qk(self, layer: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Kept queries ``[Hq, T, D]``, keys ``[Hkv, Tk, D]`` and attention parameters (scale,
        causal, sliding_window, softcap) of one layer."""
        if layer not in self.qk:
            raise AttnscopeError(
                f"the trace keeps no queries/keys for layer {layer}: analyse with keep_qk "
                f"(kept: {sorted(self.qk)})"
            )
        q, k = self.qk[layer]
        return q, k, self.meta["qk_attention"][str(layer)]

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write ``trace.json`` + ``stats.parquet`` into ``path`` atomically."""

        def fill(tmp: Path) -> None:
            pq.write_table(self.to_arrow(), tmp / STATS_FILE, compression="zstd")
            if self.qk:
                tensors = {
                    f"{kind}.{layer}": t.contiguous()
                    for layer, pair in self.qk.items()
                    for kind, t in zip("qk", pair, strict=True)
                }
                save_file(tensors, tmp / QK_FILE)
            (tmp / TRACE_FILE).write_text(json.dumps(self._header(), indent=1))

        return write_dir_atomically(Path(path), fill, overwrite=overwrite)

    def _header(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "spans": {k: list(v) for k, v in self.spans.items()},
            "layers": self.layers,
            "n_heads": self.n_heads,
            "row_metrics": list(self.rows),
            "col_metrics": list(self.cols),
            "meta": self.meta,
        }

    @staticmethod
    def load_qk(path: str | Path, layer: int) -> tuple[Tensor, Tensor]:
        """Queries ``[Hq, T, D]`` and keys ``[Hkv, T, D]`` of one layer of a saved run, read
        lazily from ``qk.safetensors`` (runs analysed with ``keep_qk``)."""
        file = Path(path) / QK_FILE
        if not file.is_file():
            raise AttnscopeError(
                f"{path} holds no queries/keys: analyse with keep_qk=[layers] (CLI: --keep-qk)"
            )
        with safe_open(str(file), framework="pt") as f:
            names = f.keys()  # safe_open is not a mapping
            if f"q.{layer}" not in names:
                kept = sorted({int(n.split(".")[1]) for n in names})
                raise AttnscopeError(f"{path} keeps queries/keys of layers {kept}, not {layer}")
            return f.get_tensor(f"q.{layer}"), f.get_tensor(f"k.{layer}")

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        path = Path(path)
        header_file = path / TRACE_FILE
        if not header_file.is_file():
            raise AttnscopeError(f"{path} is not an attnscope run: {TRACE_FILE} is missing")
        header = json.loads(header_file.read_text())
        if header.get("format_version", 0) > FORMAT_VERSION:
            raise AttnscopeError(
                f"{path} was written by a newer attnscope (format {header['format_version']} > "
                f"{FORMAT_VERSION}); upgrade attnscope to read it"
            )
        table = pq.read_table(path / STATS_FILE)
        shape = (len(header["layers"]), header["n_heads"], len(header["tokens"]))

        def tensor(name: str) -> Tensor:
            return torch.from_numpy(table[name].to_numpy().reshape(shape).copy())

        return cls(
            tokens=header["tokens"],
            token_ids=header["token_ids"],
            spans={k: (int(v[0]), int(v[1])) for k, v in header["spans"].items()},
            layers=header["layers"],
            n_heads=header["n_heads"],
            rows={m: tensor(m) for m in header["row_metrics"]},
            cols={m: tensor(m) for m in header["col_metrics"]},
            meta=header["meta"],
        )
