"""``AttentionStats``: what every backend returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class AttentionStats:
    """Row statistics per query, column statistics per key, and the log-normaliser of each row.

    Column statistics are kept as sums and counts so that calls over successive query rows (the
    steps of ``generate()``) can be added up before dividing; ``cols`` gives the final values.
    Values are float32, or float64 for float64 inputs (the request's ``compute_dtype``).
    """

    rows: dict[str, Tensor]  # name -> [B, Hq, Tq]
    col_sums: dict[str, Tensor]  # name -> [B, Hq, Tk]
    col_counts: dict[str, Tensor]  # name -> [B, 1|Hq, Tk] float32 (rows that count for the key)
    lse: Tensor  # [B, Hq, Tq] natural log; -inf for fully masked rows
    backend: str
    reason: str = ""  # why this backend ran (set by attention_stats)

    @property
    def cols(self) -> dict[str, Tensor]:
        """Final column statistics: sums divided by counts, NaN where no row counts."""
        return {
            name: finish_column(name, s, self.col_counts.get(name))
            for name, s in self.col_sums.items()
        }


def finish_column(name: str, total: Tensor, count: Tensor | None) -> Tensor:
    """``received`` is a plain sum; means (fai, sink_score) are NaN where no row counts."""
    if count is None:
        return total
    return torch.where(count > 0, total / count.clamp_min(1), float("nan"))
