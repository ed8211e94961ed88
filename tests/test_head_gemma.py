"""Head taxonomy on the real Gemma-3-270M: TransformerLens parity (TransformerBridge boot of the
same weights, ``detect_head``), head metrics against eager attentions, retrieval events."""

import pytest
import torch
from head_reference import head_rows, lookback_rows
from reference import eager_attentions

import attnscope as asc
from attnscope.models.registry import ALIASES
from attnscope.taxonomy.detect import repeated_random_tokens
from attnscope.taxonomy.retrieval import ARGMAX_TOL, copy_events, needle_prompts

pytestmark = pytest.mark.slow

TEXT = (
    "The cat sat on the mat. The dog sat on the mat too. Then the cat saw the dog, and the dog "
    "saw the cat sat on the mat, so the cat and the dog sat together on the mat."
)
DETECTORS = ("prev_token", "duplicate_token", "induction")
TL_NAMES = dict(
    prev_token="previous_token_head",
    duplicate_token="duplicate_token_head",
    induction="induction_head",
)


@pytest.fixture(scope="module")
def gemma():
    return asc.load("gemma3-270m", attn_implementation="eager")


def _trace(lm, ids, **kwargs):
    with torch.no_grad(), asc.capture(lm.model, **kwargs) as cap:
        lm.model(input_ids=ids)
    return cap.trace


def test_head_metrics_match_eager_attentions(gemma):
    ids = gemma.tokenizer(TEXT, return_tensors="pt").input_ids
    n = ids.shape[1] // 2
    trace = _trace(
        gemma,
        ids,
        metrics=(*DETECTORS, "copy_attention", "lookback"),
        spans={"source": (2, n), "context": (0, n)},
    )
    attn = torch.stack(eager_attentions(gemma.model, input_ids=ids))[:, 0]  # [L, H, T, T]
    ref = head_rows(attn, ids.expand(attn.shape[0], -1), source=(2, n))
    ref["lookback"] = lookback_rows(attn, n)
    for name, expected in ref.items():
        torch.testing.assert_close(
            trace.rows[name].double(), expected, atol=2e-5, rtol=1e-4, equal_nan=True
        )


def test_retrieval_events_match_eager(gemma):
    prompt = needle_prompts(gemma.tokenizer, 1, haystack_tokens=96, words=4, seed=3)[0]
    events, correct = copy_events(gemma, prompt)
    attn = torch.stack(eager_attentions(gemma.model, input_ids=prompt.ids[None]))[:, 0]
    rows = prompt.rows
    top = attn[..., rows, :].argmax(-1)  # [L, H, A] most attended key of each answer row
    lo, hi = prompt.source
    next_token = prompt.ids[rows + 1]
    hit = (top >= lo) & (top < hi) & (prompt.ids[top] == next_token)
    assert torch.equal(events, hit & correct)
    assert correct.all() and events.any()
    assert ARGMAX_TOL < 1e-3


# last: booting the bridge on the model changes its attention modules for later captures
def test_transformer_lens_parity(gemma):
    from transformer_lens.head_detector import (
        compute_head_attention_similarity_score,
        detect_head,
        get_induction_head_detection_pattern,
    )
    from transformer_lens.model_bridge import TransformerBridge

    ids = gemma.tokenizer(TEXT, return_tensors="pt").input_ids  # BOS first, as TL's to_tokens
    random_ids = repeated_random_tokens(gemma, 40)
    ours = _trace(gemma, ids, metrics=DETECTORS).heads()
    ours_random = _trace(gemma, random_ids, metrics=("induction",)).heads()
    bridge = TransformerBridge.boot_transformers(
        str(ALIASES["gemma3-270m"].locate()), hf_model=gemma.model, tokenizer=gemma.tokenizer
    )
    assert torch.equal(bridge.to_tokens(TEXT).cpu(), ids)
    for name in DETECTORS:
        for measure, column in (("mul", name), ("abs", f"{name}_abs")):
            theirs = detect_head(bridge, TEXT, TL_NAMES[name], error_measure=measure)
            got = torch.tensor(ours.column(column).to_pylist(), dtype=torch.float64).reshape(
                theirs.shape
            )
            torch.testing.assert_close(got, theirs.double(), atol=1e-3, rtol=0)
    # induction on repeated random tokens: TL's own pattern and score on its own cache
    _, cache = bridge.run_with_cache(random_ids, remove_batch_dim=True)
    pattern = get_induction_head_detection_pattern(random_ids.cpu())
    theirs = torch.tensor(
        [
            [
                compute_head_attention_similarity_score(
                    cache["pattern", layer, "attn"][head],
                    pattern,
                    exclude_bos=False,
                    exclude_current_token=False,
                    error_measure="mul",
                )
                for head in range(bridge.cfg.n_heads)
            ]
            for layer in range(bridge.cfg.n_layers)
        ]
    )
    got = torch.tensor(ours_random.column("induction").to_pylist(), dtype=torch.float64).reshape(
        theirs.shape
    )
    torch.testing.assert_close(got, theirs.double(), atol=1e-3, rtol=0)
    assert got.max() > 0.3  # induction heads (at most ~0.5: the first half has no pattern)
