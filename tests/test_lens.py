"""TransformerLens TransformerBridge probe: same statistics as capture on the HF model."""

import pytest
import torch
from reference import assert_trace_matches, eager_attentions

import attnscope as asc
from attnscope.errors import AttnscopeError
from attnscope.models.registry import ALIASES
from attnscope.probes.lens import capture_lens


@pytest.fixture(scope="module")
def bridge_and_model(cache_dir):
    from transformer_lens.model_bridge import TransformerBridge

    lm = asc.load("tiny-llama")
    bridged = asc.load("tiny-llama", attn_implementation="eager")
    bridge = TransformerBridge.boot_transformers(
        str(ALIASES["tiny-llama"].locate()), hf_model=bridged.model, tokenizer=bridged.tokenizer
    )
    return bridge, lm


def test_lens_matches_eager_and_capture(bridge_and_model):
    bridge, lm = bridge_and_model
    ids = torch.randint(
        5, lm.model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(4)
    )
    trace = capture_lens(bridge, ids, tokenizer=lm.tokenizer)
    attn = torch.stack(eager_attentions(lm.model, input_ids=ids))[:, 0]
    assert_trace_matches(trace, attn)
    with torch.no_grad(), asc.capture(lm.model) as cap:
        lm.model(input_ids=ids)
    for name in trace.rows:
        torch.testing.assert_close(trace.rows[name], cap.trace.rows[name], atol=1e-4, rtol=1e-4)


def test_lens_layer_selection_and_errors(bridge_and_model):
    bridge, _ = bridge_and_model
    ids = torch.randint(5, 50, (1, 12))
    assert capture_lens(bridge, ids, layers=[1]).layers == [1]
    with pytest.raises(AttnscopeError, match="outside"):
        capture_lens(bridge, ids, layers=[99])
    with pytest.raises(AttnscopeError, match=r"\[1, T\]"):
        capture_lens(bridge, torch.randint(5, 50, (2, 12)))
