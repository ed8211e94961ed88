"""``heads(lm)``: the head table of a causal LM from the prompts of each detector.

- English text (the package's paragraphs, or ``text``): previous-token, duplicate-token and
  induction scores with TransformerLens semantics, receiver kurtosis, sink score and span;
- repeated random tokens (BOS, then ``n_random`` random token ids twice): ``induction_random``
  (TransformerLens' induction score on that sequence, the usual induction-head test);
- optionally needle-in-a-haystack prompts: ``retrieval`` (``taxonomy.retrieval``).
"""

from __future__ import annotations

import time

import pyarrow as pa
import torch

from attnscope.analyze import label_run
from attnscope.errors import AttnscopeError
from attnscope.findings.texts import english_paragraphs
from attnscope.headtable import DETECTORS, head_scores, score_table
from attnscope.models.loaded import LoadedModel
from attnscope.probes.capture import capture
from attnscope.taxonomy.retrieval import needle_prompts, retrieval_scores
from attnscope.trace import Trace

TEXT_METRICS = (*DETECTORS, "mean_distance", "fai", "sink_score")


@torch.no_grad()
def detector_trace(lm: LoadedModel, ids: torch.Tensor, metrics=TEXT_METRICS) -> Trace:
    """Trace of one forward pass over ``ids`` ``[1, T]`` with the given metrics."""
    with capture(lm.model, metrics=metrics, tokenizer=lm.tokenizer) as cap:
        lm.model(input_ids=ids.to(lm.model.device), logits_to_keep=1)
    return cap.trace


def repeated_random_tokens(lm: LoadedModel, n: int, seed: int = 0) -> torch.Tensor:
    """``[1, 1 + 2n]``: BOS (when the tokenizer has one), ``n`` random ids, the same ``n`` again.
    Ids are drawn from the tokenizer's ordinary tokens (special tokens left out)."""
    tok = lm.tokenizer
    special = set(tok.all_special_ids)
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([i for i in range(min(len(tok), 50000)) if i not in special])
    body = pool[torch.randperm(len(pool), generator=g)[:n]]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return torch.cat([torch.tensor(bos, dtype=torch.long), body, body])[None]


def heads(
    lm: LoadedModel,
    text: str | None = None,
    *,
    max_tokens: int = 256,
    n_random: int = 50,
    retrieval: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> pa.Table:
    """One row per decoder head: ``layer``, ``head``, each score, ``label`` (METRICS.md, "Head
    taxonomy"). ``text``: the detector text (default: the English paragraphs, cut to
    ``max_tokens``); ``n_random``: random tokens repeated for ``induction_random``;
    ``retrieval``: number of needle prompts for retrieval scores (0: none)."""
    return detect(lm, text, max_tokens, n_random, retrieval, seed, progress)[1]


def detect(
    lm: LoadedModel,
    text: str | None,
    max_tokens: int,
    n_random: int,
    retrieval: int,
    seed: int,
    progress: bool,
) -> tuple[Trace, pa.Table]:
    """The detector text's trace and the head table (``heads``)."""
    if lm.kind != "causal-lm":
        raise AttnscopeError(f"the head taxonomy needs a causal LM; {lm.name!r} is a {lm.kind}")
    if n_random < 2:
        raise AttnscopeError(f"n_random must be >= 2 random tokens, got {n_random}")
    text = text if text is not None else " ".join(english_paragraphs()[:4])
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    if ids.shape[1] < 2:
        raise AttnscopeError(f"the text {text[:40]!r} gives {ids.shape[1]} token(s); need >= 2")
    start = time.perf_counter()
    trace = detector_trace(lm, ids)
    text = lm.tokenizer.decode(ids[0], skip_special_tokens=True)
    label_run(trace, lm, ids.shape[1], text, start)  # model and text, for its report
    scores = head_scores(trace)
    rand = head_scores(
        detector_trace(lm, repeated_random_tokens(lm, n_random, seed), ("induction",))
    )
    scores["induction_random"] = rand["induction"]
    scores["induction_random_abs"] = rand["induction_abs"]
    if retrieval:
        prompts = needle_prompts(lm.tokenizer, retrieval, seed=seed)
        scores["retrieval"], _, _ = retrieval_scores(lm, prompts, progress)
    return trace, score_table(trace.layers, scores)
