"""Generation helpers shared by the analyses and the RL trainer: left padding and its positions,
end-of-sequence and pad ids with one fallback order, cutting at the first EOS, greedy generation
with a progress bar."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList


class ProgressTick(StoppingCriteria):
    """Advances a progress bar by one token per sequence per generation step; never stops
    generation."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        self.bar.update(input_ids.shape[0])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def left_pad(seqs: Sequence[Tensor], pad_id: int, device: Any = None) -> tuple[Tensor, Tensor]:
    """1-d id tensors -> ids ``[B, T]`` and attention mask ``[B, T]`` (1 = token), padded on the
    left, on ``device``."""
    width = max(s.numel() for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - s.numel() :] = s
        mask[row, width - s.numel() :] = 1
    return ids.to(device), mask.to(device)


def padded_positions(mask: Tensor) -> Tensor:
    """Position ids ``[B, T]`` of a left-padded attention mask ``[B, T]``: each sequence counts
    from 0 at its first token (as ``generate()`` does), padding gets 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The end-of-sequence ids: the model's generation config's (one or several), else the
    tokenizer's, else none (generation then runs to its token budget). ``model`` may be None."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def pad_token_id(model: Any, tokenizer: Any) -> int:
    """The tokenizer's pad id, else the first end-of-sequence id (``eos_ids``), else 0 (padding
    is always masked out). ``model`` may be None."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return next(iter(eos_ids(model, tokenizer)), 0)


def cut_at_eos(tokens: Tensor, eos: Collection[int]) -> Tensor:
    """``tokens`` ``[N]`` up to and including the first id in ``eos`` (all of it if none)."""
    hits = torch.nonzero(torch.isin(tokens, torch.tensor(list(eos), dtype=tokens.dtype))).flatten()
    return tokens[: int(hits[0]) + 1] if hits.numel() else tokens


def greedy_generate(
    model: Any, tok: Any, ids: Tensor, attention_mask: Tensor, n_new: int, bar: tqdm
) -> Any:
    """Greedy generation of up to ``n_new`` tokens after ``ids`` ``[B, T0]`` (left-padded when
    B > 1), stopping at ``eos_ids``, ticking ``bar`` per generated token; generate()'s output
    (``.sequences`` ``[B, T0 + generated]``, finished sequences continued with the pad id)."""
    return model.generate(
        ids,
        attention_mask=attention_mask,
        max_new_tokens=n_new,
        do_sample=False,
        return_dict_in_generate=True,
        stopping_criteria=StoppingCriteriaList([ProgressTick(bar)]),
        pad_token_id=pad_token_id(model, tok),
        eos_token_id=eos_ids(model, tok) or None,
    )
