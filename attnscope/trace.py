"""``Trace``: tokens, spans and per-layer, per-head attention statistics of one sequence."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from attnscope import metrics
from attnscope.atomic import write_dir_atomically
from attnscope.errors import AttnscopeError
from attnscope.runfiles import QK_FILE, RUN_VERSION, STATS_FILE, TRACE_FILE

FORMAT_VERSION = RUN_VERSION
INDEX_COLUMNS = ("layer", "head", "position", "token")


QK_DISK_DTYPE = torch.float16


class StoredQK(Mapping[int, tuple[Tensor, Tensor]]):
    """Kept queries and keys of a saved run, ``layer -> (q [Hq, T, D], k [Hkv, Tk, D])``.

    Nothing is read on creation; the layers come from the file's header, and a layer's tensors
    are read from ``qk.safetensors`` each time it is asked for (no copy is kept in memory).
    """

    def __init__(self, file: Path) -> None:
        self.file = file
        self._layers: tuple[int, ...] | None = None

    @contextmanager
    def _open(self) -> Iterator[Any]:
        try:
            with safe_open(str(self.file), framework="pt") as f:
                yield f
        except (OSError, SafetensorError) as err:
            raise AttnscopeError(f"cannot read kept queries/keys from {self.file}: {err}") from err

    @property
    def layers(self) -> tuple[int, ...]:
        if self._layers is None:
            with self._open() as f:
                names = set(f.keys())  # safe_open is not a mapping
            layers = sorted(int(n[2:]) for n in names if n[:2] == "q." and n[2:].isdigit())
            if names != {f"{kind}.{layer}" for layer in layers for kind in "qk"}:
                raise AttnscopeError(
                    f"{self.file} is damaged: expected tensors q.<layer> and k.<layer>, "
                    f"found {sorted(names)}"
                )
            self._layers = tuple(layers)
        return self._layers

    def __getitem__(self, layer: int) -> tuple[Tensor, Tensor]:
        if layer not in self.layers:
            raise KeyError(layer)
        with self._open() as f:  # stored as float16: computed with in float32
            return f.get_tensor(f"q.{layer}").float(), f.get_tensor(f"k.{layer}").float()

    def __contains__(self, layer: object) -> bool:  # Mapping's default would read the tensors
        return layer in self.layers

    def __iter__(self) -> Iterator[int]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


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
    # Tk = T, except for cross-attention, whose keys are the encoder positions. Loaded runs read
    # them from disk on demand (StoredQK).
    qk: Mapping[int, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)

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

    def head_groups(
        self, fraction: float = metrics.HEAD_GROUP_FRACTION, span: str | None = None
    ) -> dict[str, Tensor]:
        """Local (bottom ``fraction`` by head span) and global (top) heads, bool ``[L, H]``."""
        return metrics.head_groups(self.head_span(span), fraction)

    def sink_heads(self, eps: float = metrics.SINK_EPS) -> Tensor:
        """Heads whose first-token sink score exceeds ``eps``, bool ``[L, H]``."""
        return metrics.sink_heads(self.cols["sink_score"][..., 0], eps)

    def head_tags(
        self, fraction: float = metrics.HEAD_GROUP_FRACTION, eps: float = metrics.SINK_EPS
    ) -> dict[str, Tensor]:
        """The tags of heads: "local", "global" (``head_groups``) and "sink" (``sink_heads``),
        bool ``[L, H]`` each."""
        return {**self.head_groups(fraction), "sink": self.sink_heads(eps)}

    def heads(self) -> pa.Table:
        """One row per (layer, head): every head score this trace's metrics give (detectors with
        TransformerLens semantics, lookback, receiver, sink, span) and a label
        (``attnscope.headtable``)."""
        from attnscope.headtable import head_table

        return head_table(self)

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
            kept = sorted(self.qk) or "none"
            raise AttnscopeError(
                f"the trace keeps no queries/keys for layer {layer} (kept: {kept}); "
                f"analyse with keep_qk=[{layer}] (CLI: `attnscope analyze ... --keep-qk {layer}` "
                "or `--keep-qk all`)"
            )
        q, k = self.qk[layer]
        return q, k, self.meta["qk_attention"][str(layer)]

    def save(
        self,
        path: str | Path,
        overwrite: bool = False,
        extra: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write ``trace.json`` + ``stats.parquet`` (+ ``qk.safetensors``) into the run directory
        ``path`` atomically (``attnscope.atomic.write_dir_atomically``: a new path or an empty
        directory; an existing attnscope run only if ``overwrite``). ``extra(tmp)`` adds files
        (report, figures) to the temporary directory, so that they appear with the run."""

        def fill(tmp: Path) -> None:
            pq.write_table(self.to_arrow(), tmp / STATS_FILE, compression="zstd")
            if self.qk:
                tensors = {  # float16 on disk: half the size, ample for the views' rows
                    f"{kind}.{layer}": t.to(QK_DISK_DTYPE).contiguous()
                    for layer, pair in self.qk.items()
                    for kind, t in zip("qk", pair, strict=True)
                }
                save_file(tensors, tmp / QK_FILE)
            (tmp / TRACE_FILE).write_text(json.dumps(self._header(), indent=1))
            if extra is not None:
                extra(tmp)

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
        """Queries ``[Hq, T, D]`` and keys ``[Hkv, Tk, D]`` of one layer of a saved run, read
        from ``qk.safetensors`` (runs analysed with ``keep_qk``) without loading the run."""
        file = Path(path) / QK_FILE
        if not file.is_file():
            raise AttnscopeError(
                f"{path} holds no queries/keys: analyse with keep_qk=[layers] (CLI: --keep-qk)"
            )
        qk = StoredQK(file)
        if layer not in qk:
            raise AttnscopeError(f"{path} keeps queries/keys of layers {list(qk)}, not {layer}")
        return qk[layer]

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

        # a run whose header names kept layers but lacks the file fails when they are asked for
        qk_file = path / QK_FILE
        kept = qk_file.is_file() or header["meta"].get("qk_attention")

        return cls(
            tokens=header["tokens"],
            token_ids=header["token_ids"],
            spans={k: (int(v[0]), int(v[1])) for k, v in header["spans"].items()},
            layers=header["layers"],
            n_heads=header["n_heads"],
            rows={m: tensor(m) for m in header["row_metrics"]},
            cols={m: tensor(m) for m in header["col_metrics"]},
            meta=header["meta"],
            qk=StoredQK(qk_file) if kept else {},
        )
