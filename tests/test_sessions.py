"""Probe sessions: one per model, captures and interventions compose, models stay independent;
the family table finds every attention stack of each tiny model."""

import pytest
import torch
from reference import assert_trace_matches, eager_attentions

import attnscope as asc
from attnscope.interventions import SinkSuppression
from attnscope.models.families import attention_site
from attnscope.probes import interface
from attnscope.probes.session import ProbeSession


@pytest.fixture(scope="module")
def gpt2(cache_dir):
    return asc.load("tiny-gpt2")


@pytest.fixture(scope="module")
def llama(cache_dir):
    return asc.load("tiny-llama")


def ids_for(lm, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, lm.model.config.vocab_size, (1, n), generator=g)


def alone(lm, ids):
    with torch.no_grad(), asc.capture(lm.model) as cap:
        lm.model(input_ids=ids)
    return cap.trace


def assert_same(a, b):
    assert a.token_ids == b.token_ids and a.layers == b.layers
    for name in {**a.rows, **a.cols}:
        got = a.rows.get(name, a.cols.get(name))
        want = b.rows.get(name, b.cols.get(name))
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_two_models_captured_at_once_are_independent(gpt2, llama):
    ids_a, ids_b = ids_for(gpt2, 14, 0), ids_for(llama, 9, 1)
    with torch.no_grad(), asc.capture(gpt2.model) as cap_a, asc.capture(llama.model) as cap_b:
        gpt2.model(input_ids=ids_a)
        llama.model(input_ids=ids_b)
    assert_same(cap_a.trace, alone(gpt2, ids_a))
    assert_same(cap_b.trace, alone(llama, ids_b))
    assert ProbeSession.of(gpt2.model) is not ProbeSession.of(llama.model)


def test_nested_captures_each_see_the_whole_run(llama):
    ids = ids_for(llama, 12, 2)
    with (
        torch.no_grad(),
        asc.capture(llama.model) as outer,
        asc.capture(llama.model, metrics=("entropy",), layers=[1]) as inner,
    ):
        out = llama.model.generate(
            ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True
        )
        llama.model(input_ids=out.sequences[:, -1:], past_key_values=out.past_key_values)
    attn = torch.stack(eager_attentions(llama.model, input_ids=out.sequences))[:, 0]
    assert_trace_matches(outer.trace, attn)
    torch.testing.assert_close(inner.trace.rows["entropy"], outer.trace.rows["entropy"][1:])
    session = ProbeSession.of(llama.model)
    assert session.observers == [] and session.editors == []
    assert not any(interface.watching.get(m) for m in llama.model.modules())


def test_capture_inside_an_edit_measures_the_edited_attention(llama):
    ids = ids_for(llama, 10, 3)
    edit = SinkSuppression(tokens=[0], end=1)
    with torch.no_grad(), edit.applied(llama.model), asc.capture(llama.model) as cap:
        llama.model(input_ids=ids)
    llama.model.set_attn_implementation("eager")  # the edit keeps eager: attentions come back
    try:
        with torch.no_grad(), edit.applied(llama.model):
            edited = llama.model(input_ids=ids, output_attentions=True).attentions
    finally:
        llama.model.set_attn_implementation("sdpa")
    plain = eager_attentions(llama.model, input_ids=ids)
    assert len(edited) == len(plain) == 2
    assert not torch.allclose(edited[0][0, :, -1], plain[0][0, :, -1])  # the edit shows
    assert_trace_matches(cap.trace, torch.stack(edited)[:, 0])


def test_a_second_independent_forward_is_refused_not_mixed(gpt2):
    with torch.no_grad(), asc.capture(gpt2.model) as cap:
        gpt2.model(input_ids=ids_for(gpt2, 10, 4))
        gpt2.model(input_ids=ids_for(gpt2, 10, 5))
    with pytest.raises(asc.errors.AttnscopeError, match="more than one independent forward"):
        cap.traces()


EXPECTED_ROLES = {
    "tiny-gpt2": {"decoder": 2},
    "tiny-llama": {"decoder": 2},
    "tiny-whisper": {"encoder": 2, "decoder": 2, "cross": 2},
    "tiny-llava": {"decoder": 2, "vision": 2},
    "tiny-qwen2-vl": {"decoder": 2, "vision": 2},
}


@pytest.mark.parametrize("alias", sorted(EXPECTED_ROLES))
def test_family_table_finds_every_attention_stack(alias, cache_dir):
    model = asc.load(alias).model
    sites = ProbeSession.of(model).sites.values()
    roles = {}
    for site in sites:
        roles[site.role] = roles.get(site.role, 0) + 1
        assert site.causal == (site.role == "decoder")
    assert roles == EXPECTED_ROLES[alias]


def test_unknown_family_falls_back_to_the_module():
    class Attention(torch.nn.Module):
        is_causal = False

    site = attention_site("brand-new", "blocks.3.mixer", Attention())
    assert (site.stack, site.layer, site.role, site.causal) == (
        "blocks.{}.mixer",
        3,
        "encoder",
        False,
    )
    cross = attention_site("brand-new", "blocks.1.crossattention", Attention())
    assert cross.role == "cross" and not cross.causal
    assert attention_site("brand-new", "blocks.1.mlp", torch.nn.Linear(2, 2)) is None
