"""Retrieval heads (Wu et al. 2024): heads that copy-paste from a needle in a haystack.

Prompts are generated here: English paragraphs (the haystack) with a needle sentence, "The secret
passphrase is: w1 w2 ... wk.", inserted at a random depth; the prompt ends with "The secret
passphrase is:" and the answer is the passphrase. The model reads prompt + answer (teacher
forcing). A head copy-pastes at an answer row t (the row that predicts token x_{t+1} of the
answer) when the model predicts x_{t+1} and the head's most attended key is a copy of x_{t+1}
inside the needle's passphrase: ``copy_attention[t] == max_attention[t]`` (row statistics with
the ``source`` span on the passphrase). Retrieval score of a head = copy-paste events / answer
tokens, over all prompts. Copy accuracy = share of answer tokens the model predicts; the ablation
zeroes heads' outputs (``ablation.zeroed_heads``) and measures it again.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from attnscope.errors import AttnscopeError
from attnscope.findings.texts import english_paragraphs
from attnscope.models.loaded import LoadedModel
from attnscope.probes.capture import capture
from attnscope.taxonomy.ablation import zeroed_heads

WORDS = [
    "apple",
    "river",
    "candle",
    "garden",
    "pencil",
    "mirror",
    "window",
    "forest",
    "ladder",
    "violin",
    "rocket",
    "pillow",
    "island",
    "copper",
    "marble",
    "lantern",
    "meadow",
    "harbor",
    "falcon",
    "orchid",
    "velvet",
    "saddle",
    "thunder",
    "basket",
    "compass",
    "glacier",
    "pepper",
    "canyon",
    "silver",
    "tunnel",
]
NEEDLE = "The secret passphrase is:"
ARGMAX_TOL = 1e-4  # relative: copy_attention equals the row maximum up to float rounding


@dataclass(frozen=True)
class NeedlePrompt:
    ids: Tensor  # [T] prompt + answer token ids
    source: tuple[int, int]  # positions [start, end) of the passphrase inside the needle
    answer: tuple[int, int]  # positions [start, end) of the answer at the end

    @property
    def rows(self) -> Tensor:
        """Rows that predict the answer tokens ``[A]``."""
        return torch.arange(self.answer[0] - 1, self.answer[1] - 1)

    def predicted(self, model: torch.nn.Module) -> Tensor:
        """Whether ``model`` predicts each answer token under teacher forcing ``[A]`` (logits of
        the answer rows only)."""
        n = len(self.rows) + 1  # the answer rows and the last token's
        logits = model(input_ids=self.ids[None].to(model.device), logits_to_keep=n).logits
        return logits[0, :-1].argmax(-1).cpu() == self.ids[self.rows + 1]


def needle_prompts(
    tokenizer, n: int, haystack_tokens: int = 256, words: int = 5, seed: int = 0
) -> list[NeedlePrompt]:
    """``n`` needle-in-a-haystack prompts of about ``haystack_tokens`` haystack tokens each."""
    if n < 1 or words < 1 or haystack_tokens < 1:
        raise AttnscopeError(
            f"need n, words, haystack_tokens >= 1; got {n}, {words}, {haystack_tokens}"
        )
    rng = random.Random(seed)
    paragraphs = english_paragraphs()

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for _ in range(n):
        hay: list[int] = []
        while len(hay) < haystack_tokens:
            hay += encode(" " + rng.choice(paragraphs))
        hay = hay[:haystack_tokens]
        cut = rng.randrange(haystack_tokens // 10, haystack_tokens * 9 // 10)
        value = encode(" " + " ".join(rng.sample(WORDS, words)))
        needle_start = len(bos) + cut + len(encode(" " + NEEDLE))
        ids = [
            *bos,
            *hay[:cut],
            *encode(" " + NEEDLE),
            *value,
            *encode("."),
            *hay[cut:],
            *encode("\n" + NEEDLE),
        ]
        answer = (len(ids), len(ids) + len(value))
        out.append(
            NeedlePrompt(
                torch.tensor(ids + value),
                (needle_start, needle_start + len(value)),
                answer,
            )
        )
    return out


@torch.no_grad()
def copy_events(lm: LoadedModel, prompt: NeedlePrompt) -> tuple[Tensor, Tensor]:
    """Copy-paste events ``[L, H, A]`` (bool) of every head at the answer rows and whether the
    model predicts each answer token ``[A]``."""
    with capture(
        lm.model, metrics=("copy_attention", "max_attention"), spans={"source": prompt.source}
    ) as cap:
        correct = prompt.predicted(lm.model)
    trace = cap.trace
    rows = prompt.rows
    copy = trace.rows["copy_attention"][..., rows]  # [L, H, A]
    top = trace.rows["max_attention"][..., rows]
    events = (copy >= top * (1 - ARGMAX_TOL)) & correct
    return events, correct


@torch.no_grad()
def copy_accuracy(
    lm: LoadedModel, prompts: list[NeedlePrompt], heads: list[tuple[int, int]] = ()
) -> float:
    """Share of answer tokens predicted (teacher forcing) with ``heads`` zeroed."""
    hits = total = 0
    with zeroed_heads(lm.model, heads):
        for p in prompts:
            hits += int(p.predicted(lm.model).sum())
            total += len(p.rows)
    return hits / total


@dataclass
class RetrievalResult:
    model: str
    layers: list[int]
    scores: Tensor  # [L, H] copy-paste events / answer tokens
    accuracy: float  # copy accuracy of the intact model
    n_prompts: int
    n_tokens: int  # answer tokens
    top: list[tuple[int, int]]  # heads ablated, best first
    top_accuracy: float  # copy accuracy with the top heads zeroed
    random_accuracy: list[float]  # copy accuracy with as many random heads zeroed, per draw
    seconds: float

    def summary(self) -> str:
        rand = torch.tensor(self.random_accuracy)
        return (
            f"{self.model}: copy accuracy {self.accuracy:.3f} intact, {self.top_accuracy:.3f} "
            f"with the top {len(self.top)} retrieval heads zeroed {self.top}, "
            f"{float(rand.mean()):.3f} (min {float(rand.min()):.3f}, max {float(rand.max()):.3f})"
            f" with {len(self.top)} random heads zeroed ({len(rand)} draws); {self.n_prompts} "
            f"prompts, {self.n_tokens} answer tokens, {self.seconds:.0f} s"
        )


def retrieval_scores(
    lm: LoadedModel, prompts: list[NeedlePrompt], progress: bool = True
) -> tuple[Tensor, float, int]:
    """Retrieval score per head ``[L, H]``, the copy accuracy and the number of answer tokens."""
    if lm.kind != "causal-lm":
        raise AttnscopeError(f"retrieval heads need a causal LM; {lm.name!r} is a {lm.kind}")
    events, hits, total = None, 0, 0
    for p in tqdm(prompts, desc="retrieval", unit="prompt", disable=not progress):
        found, correct = copy_events(lm, p)
        count = found.sum(-1).double()
        events = count if events is None else events + count
        hits += int(correct.sum())
        total += len(correct)
    assert events is not None
    return events / total, hits / total, total


def measure_retrieval(
    lm: LoadedModel,
    n_prompts: int = 20,
    haystack_tokens: int = 256,
    top_k: int = 8,
    draws: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> RetrievalResult:
    """Retrieval scores, then copy accuracy with the ``top_k`` best heads zeroed and with
    ``top_k`` random heads zeroed (``draws`` draws; prompts from another seed)."""
    start = time.perf_counter()
    prompts = needle_prompts(lm.tokenizer, n_prompts, haystack_tokens, seed=seed)
    scores, _, n_tokens = retrieval_scores(lm, prompts, progress)
    n_layers, n_heads = scores.shape
    order = scores.reshape(-1).argsort(descending=True, stable=True)[:top_k].tolist()
    top = [(i // n_heads, i % n_heads) for i in order]
    held_out = needle_prompts(lm.tokenizer, n_prompts, haystack_tokens, seed=seed + 1)
    rng = random.Random(seed)
    every = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    random_acc = [copy_accuracy(lm, held_out, rng.sample(every, top_k)) for _ in range(draws)]
    return RetrievalResult(
        model=lm.name,
        layers=list(range(n_layers)),
        scores=scores,
        accuracy=copy_accuracy(lm, held_out),
        n_prompts=n_prompts,
        n_tokens=n_tokens,
        top=top,
        top_accuracy=copy_accuracy(lm, held_out, top),
        random_accuracy=random_acc,
        seconds=time.perf_counter() - start,
    )
