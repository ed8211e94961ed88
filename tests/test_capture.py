"""Capture on tiny random models: captured statistics equal eager output_attentions."""

import pytest
import torch
from reference import assert_trace_matches, eager_attentions

import attnscope as asc
from attnscope.errors import AttnscopeError, UnsupportedMetricError
from attnscope.probes import interface
from attnscope.probes.session import ProbeSession

MODELS = ["tiny-gpt2", "tiny-llama"]


@pytest.fixture(scope="module", params=MODELS)
def lm(request, cache_dir):
    return asc.load(request.param)


def prompt_ids(lm, n: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, lm.model.config.vocab_size, (1, n), generator=g)


def test_forward_matches_eager(lm):
    ids = prompt_ids(lm)
    with torch.no_grad(), asc.capture(lm.model) as cap:
        lm.model(input_ids=ids)
    trace = cap.trace
    attn = torch.stack(eager_attentions(lm.model, input_ids=ids))[:, 0]  # [L, H, T, T]
    assert len(trace) == ids.shape[1] and trace.token_ids == ids[0].tolist()
    assert_trace_matches(trace, attn)


def test_logits_and_generation_untouched(lm):
    ids = prompt_ids(lm, 20)
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits
        plain_gen = lm.model.generate(ids, max_new_tokens=8, do_sample=False)
        with asc.capture(lm.model):
            captured = lm.model(input_ids=ids).logits
            captured_gen = lm.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(plain, captured)
    assert torch.equal(plain_gen, captured_gen)


def test_generate_matches_one_eager_pass(lm):
    ids = prompt_ids(lm, 30, seed=1)
    with torch.no_grad(), asc.capture(lm.model) as cap:
        out = lm.model.generate(
            ids, max_new_tokens=25, do_sample=False, return_dict_in_generate=True
        )
        seq = out.sequences
        lm.model(input_ids=seq[:, -1:], past_key_values=out.past_key_values)  # last token's row
    trace = cap.trace
    assert trace.token_ids == seq[0].tolist()
    attn = torch.stack(eager_attentions(lm.model, input_ids=seq))[:, 0]
    assert_trace_matches(trace, attn)


@pytest.mark.parametrize("lengths", [(40, 27), (150, 40)])  # padding below and above 64 keys
def test_padded_batch_matches_each_sequence_alone(lm, lengths):
    long, short = prompt_ids(lm, lengths[0], seed=2), prompt_ids(lm, lengths[1], seed=3)
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real positions, as batched pipelines pass
    with torch.no_grad(), asc.capture(lm.model) as cap:
        lm.model(input_ids=ids, attention_mask=mask, position_ids=positions)
    traces = cap.traces()
    assert [len(t) for t in traces] == list(lengths)
    for trace, seq in zip(traces, (long, short), strict=True):
        attn = torch.stack(eager_attentions(lm.model, input_ids=seq))[:, 0]
        assert_trace_matches(trace, attn)


def test_layers_metrics_and_spans(lm):
    ids = prompt_ids(lm, 16)
    with (
        torch.no_grad(),
        asc.capture(
            lm.model, metrics=["waad", "span_mass:head", "fai"], layers=[1], spans={"head": (0, 4)}
        ) as cap,
    ):
        lm.model(input_ids=ids)
    trace = cap.trace
    assert trace.layers == [1]
    assert set(trace.rows) == {"waad", "span_mass:head"} and set(trace.cols) == {"fai"}
    attn = eager_attentions(lm.model, input_ids=ids)[1][0]  # [H, T, T]
    torch.testing.assert_close(
        trace.rows["span_mass:head"][0], attn[..., :4].sum(-1), atol=1e-5, rtol=1e-5
    )


def test_model_restored_after_exception(lm):
    before = lm.model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"), asc.capture(lm.model):
        assert lm.model.config._attn_implementation.startswith("attnscope")
        raise RuntimeError("boom")
    assert lm.model.config._attn_implementation == before
    assert ProbeSession.of(lm.model).observers == []
    assert not any(interface.watching.get(m) for m in lm.model.modules())


def test_eager_model_keeps_output_attentions(lm):
    """A model loaded with eager stays eager under capture: attentions come back, stats agree."""
    ids = prompt_ids(lm, 12)
    lm.model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), asc.capture(lm.model) as cap:
            out = lm.model(input_ids=ids, output_attentions=True)
    finally:
        lm.model.set_attn_implementation("sdpa")
    assert len(out.attentions) == lm.model.config.num_hidden_layers
    assert_trace_matches(cap.trace, torch.stack(out.attentions)[:, 0])


def test_errors_name_the_problem(lm):
    with pytest.raises(AttnscopeError, match="not a transformers PreTrainedModel"):
        asc.capture(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedMetricError, match="nope"):
        asc.capture(lm.model, metrics=["nope"])
    with asc.capture(lm.model) as cap:
        pass
    with pytest.raises(AttnscopeError, match="no attention call was captured"):
        cap.traces()


def test_triton_backend_in_capture(lm):
    """The fused kernels (interpreted on the CPU) give the same trace as the chunked backend."""
    ids = prompt_ids(lm, 40, seed=5)
    traces = {}
    for backend in ("chunked", "triton"):
        with torch.no_grad(), asc.capture(lm.model, backend=backend) as cap:
            lm.model(input_ids=ids)
        traces[backend] = cap.trace
    assert traces["triton"].meta["backend"] == "triton"
    for table in ("rows", "cols"):
        for name, value in getattr(traces["chunked"], table).items():
            torch.testing.assert_close(
                getattr(traces["triton"], table)[name], value, atol=1e-4, rtol=1e-4, equal_nan=True
            )


def test_kept_queries_and_keys_rebuild_eager_attention(lm, tmp_path):
    """q/k kept during generate(), saved and lazily reloaded, give eager attention tiles back."""
    from attnscope.kernels.tiles import attention_tile

    ids = prompt_ids(lm, 20, seed=6)
    with torch.no_grad(), asc.capture(lm.model, keep_qk=[1]) as cap:
        out = lm.model.generate(
            ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True
        )
    trace = cap.trace
    n = len(trace)
    assert set(trace.qk) == {1} and trace.qk[1][0].shape[:2] == (trace.n_heads, n)
    trace.save(tmp_path / "run")
    q, k = asc.Trace.load_qk(tmp_path / "run", 1)
    params = asc.Trace.load(tmp_path / "run").meta["qk_attention"]["1"]
    attn = eager_attentions(lm.model, input_ids=out.sequences[:, :n])[1][0]  # [H, T, T]
    for head in range(trace.n_heads):
        tile = attention_tile(
            q, k, head, (5, n), (0, n), scale=params["scale"], causal=params["causal"]
        )
        torch.testing.assert_close(tile, attn[head, 5:n], atol=1e-5, rtol=1e-5)
    pooled = attention_tile(q, k, 0, (0, n), (0, n), scale=params["scale"], pool=4)
    torch.testing.assert_close(pooled[0, 0], attn[0, :4, :4].mean(), atol=1e-6, rtol=1e-5)
    with pytest.raises(AttnscopeError, match="layers \\[1\\], not 0"):
        asc.Trace.load_qk(tmp_path / "run", 0)
