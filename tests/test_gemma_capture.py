"""Capture on the real Gemma-3-270M (sliding-window and global layers, GQA)."""

import pytest
import torch
from reference import assert_trace_matches, eager_attentions

import attnscope as asc

pytestmark = pytest.mark.slow

TEXT = (
    "In the old harbour town, the lighthouse keeper wrote every evening in a thick notebook. "
    "He noted the wind, the colour of the sea, the ships that passed and the birds that rested "
    "on the rail. "
)


@pytest.fixture(scope="module")
def gemma():
    return asc.load("gemma3-270m")


def test_sliding_and_global_layers_present(gemma):
    types = gemma.model.config.layer_types
    assert "sliding_attention" in types and "full_attention" in types
    assert gemma.model.config.sliding_window < 700


def test_forward_beyond_the_sliding_window_matches_eager(gemma):
    ids = gemma.tokenizer(TEXT * 20, return_tensors="pt").input_ids[:, :700]
    assert ids.shape[1] == 700 > gemma.model.config.sliding_window
    with torch.no_grad():
        plain = gemma.model(input_ids=ids).logits
        with asc.capture(gemma.model) as cap:
            captured = gemma.model(input_ids=ids).logits
    assert torch.equal(plain, captured)
    attn = torch.stack(eager_attentions(gemma.model, input_ids=ids))[:, 0]
    assert_trace_matches(cap.trace, attn)


def test_generate_matches_eager(gemma):
    trace = asc.analyze(
        gemma, "The Eiffel Tower is located in the city of", generate=16, progress=False
    )
    assert "Paris" in trace.meta["generated_text"]
    attn = torch.stack(eager_attentions(gemma.model, input_ids=torch.tensor([trace.token_ids])))[
        :, 0
    ]
    assert_trace_matches(trace, attn)
    assert trace.sink_heads().any()  # Gemma has first-token sink heads
