"""Per-module accumulation of statistics across the calls of one capture (prefill + decode steps)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnscope.kernels import AttentionStats


@dataclass
class ModuleRecord:
    """Statistics of one attention module, keyed by absolute token index (cache slot order)."""

    name: str
    causal: bool
    role: str = "decoder"  # decoder | encoder | cross | vision (models.families)
    n_heads: int = 0
    next_row: int = 0  # one past the last query index stored
    restarted: bool = False  # a second, independent sequence reached this module (not stored)
    pad: Tensor | None = None  # [B] leading padding tokens per sequence (from the first call)
    row_steps: list[tuple[Tensor, dict[str, Tensor]]] = field(default_factory=list)
    col_sums: dict[str, Tensor] = field(default_factory=dict)  # [B, H, N]
    col_counts: dict[str, Tensor] = field(default_factory=dict)  # [B, 1|H, N]
    q_steps: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # query index, q
    k_steps: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # key index, k
    attention: dict = field(default_factory=dict)  # scale, softcap, sliding_window, causal

    def keep_qk(self, q_index: Tensor, query: Tensor, key: Tensor, k_index: Tensor) -> None:
        """Keep the post-RoPE queries ``[B, Hq, Tq, D]`` and the keys not kept by an earlier call
        (a decode step's new token; cross-attention's encoder keys only once)."""
        kept = int(self.k_steps[-1][0].max()) + 1 if self.k_steps else 0
        new = k_index >= kept
        self.q_steps.append((q_index.cpu(), query.detach().cpu()))
        if new.any():
            self.k_steps.append((k_index[new].cpu(), key[:, :, new].detach().cpu()))

    @property
    def cross(self) -> bool:
        """Cross-attention: the keys are encoder positions, not tokens of this sequence."""
        return self.role == "cross"

    @property
    def has_qk(self) -> bool:
        return bool(self.q_steps)

    def qk(self) -> tuple[Tensor, Tensor]:
        """Queries ``[B, Hq, Nq, D]`` and keys ``[B, Hkv, Nk, D]``, each in index order."""
        return _in_order(self.q_steps), _in_order(self.k_steps)

    def add(self, q_index: Tensor, k_index: Tensor, stats: AttentionStats) -> None:
        """Store rows at query indices ``[Tq]`` and add columns at key indices ``[Tk]``."""
        if q_index.numel() and int(q_index[0]) < self.next_row:
            self.restarted = True  # a second sequence: not mixed into the first
            return
        self.next_row = int(q_index[-1]) + 1 if q_index.numel() else self.next_row
        self.n_heads = stats.lse.shape[1]
        self.row_steps.append((q_index.cpu(), {k: v.cpu() for k, v in stats.rows.items()}))
        n = int(k_index.max()) + 1 if k_index.numel() else 0
        for store, update in ((self.col_sums, stats.col_sums), (self.col_counts, stats.col_counts)):
            for name, value in update.items():
                buf = _grow(store.get(name), value, n)
                buf[..., k_index.cpu()] += value.cpu()
                store[name] = buf

    def rows(self) -> tuple[Tensor, dict[str, Tensor]]:
        """All rows in index order: indices ``[N]`` and metrics ``[B, H, N]``."""
        index = torch.cat([i for i, _ in self.row_steps])
        order = torch.argsort(index, stable=True)
        names = self.row_steps[0][1].keys() if self.row_steps else []
        merged = {
            n: torch.cat([r[n] for _, r in self.row_steps], dim=-1)[..., order] for n in names
        }
        return index[order], merged


def _in_order(steps: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Concatenate per-call ``[B, H, t, D]`` chunks along t, sorted by their token indices."""
    order = torch.argsort(torch.cat([i for i, _ in steps]), stable=True)
    return torch.cat([x for _, x in steps], dim=2)[:, :, order]


def _grow(buf: Tensor | None, like: Tensor, n: int) -> Tensor:
    """A zero-padded buffer of ``like``'s leading shape and at least ``n`` columns."""
    shape = (*like.shape[:-1], n)
    if buf is None:
        return torch.zeros(shape, dtype=torch.float32)
    if buf.shape[-1] >= n and buf.shape[:-1] == like.shape[:-1]:
        return buf
    out = torch.zeros(
        (*torch.broadcast_shapes(buf.shape[:-1], like.shape[:-1]), max(n, buf.shape[-1]))
    )
    out[..., : buf.shape[-1]] += buf
    return out
