"""``LoadedModel``: a transformers model with its tokenizer or processor and what kind it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

Kind = Literal["causal-lm", "vlm", "speech", "encoder"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    processor: Any | None
    kind: Kind
    name: str
    source: str  # where the weights came from: a cache directory, a package, an HF id

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return (
            f"LoadedModel(name={self.name!r}, kind={self.kind!r}, "
            f"params={n / 1e6:.1f}M, source={self.source!r})"
        )
