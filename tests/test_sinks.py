"""Learned attention sinks (gpt-oss): a per-head logit in the softmax denominator that takes no key.

Backends against the float64 reference are in test_independent_reference.py (``sinks*`` cases);
here: the definitions by hand, request errors, backend capabilities, and capture of a tiny random
gpt-oss (sliding + full layers, GQA, sinks set clearly away from 0) against eager attentions, whose
rows sum to 1 - the sink's probability.
"""

from __future__ import annotations

import math

import pytest
import torch
from independent import reference_stats
from reference import eager_attentions
from reference import reference_stats as eager_reference
from torch import Tensor
from transformers import Gemma2Config, Gemma2ForCausalLM, GptOssConfig, GptOssForCausalLM

import attnscope as asc
from attnscope import kernels, metrics
from attnscope.errors import ShapeError, UnsupportedMetricError
from attnscope.kernels.backends import Backend, Capabilities
from attnscope.kernels.request import build_request
from attnscope.kernels.tiles import attention_tile

TOL = 1e-4
WINDOW = 6  # the sliding layers' window, shorter than every prompt below


@pytest.fixture(scope="module")
def model() -> GptOssForCausalLM:
    """2 layers (sliding, full), 4 query / 2 KV heads, 4 experts; sinks ~ randn * 2."""
    config = GptOssConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=32,
        head_dim=8,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
        max_position_embeddings=131072,  # = yarn factor x original length: no rope warning
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(config.num_attention_heads) * 2)
    assert config.layer_types == ["sliding_attention", "full_attention"]
    assert model.config._attn_implementation == "eager"  # gpt-oss has no SDPA path
    return model


def prompt_ids(n: int, seed: int = 0) -> Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def eager_sink_reference(attn: Tensor) -> dict[str, Tensor]:
    """Every metric from eager probabilities ``[L, H, T, T]`` over the keys; the sink's share is
    what the rows miss (eager gpt-oss drops the sink column after the softmax)."""
    sink = 1 - attn.double().sum(-1)  # [L, H, T]
    ref = eager_reference(attn.float())
    ref["entropy"] = metrics.entropy(attn.double(), sink).float()
    ref["sink_logit_mass"] = sink.float()
    return ref


def assert_trace_matches_sinks(trace: asc.Trace, attn: Tensor) -> None:
    got = {**trace.rows, **trace.cols}
    expected = eager_sink_reference(attn)
    assert set(got) == set(expected), set(got) ^ set(expected)
    for name, want in expected.items():
        torch.testing.assert_close(
            got[name], want, atol=TOL, rtol=TOL, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.fixture(params=["eager", "flex_attention"])
def implementation(request, model):
    """The model's attention implementation: eager (captured by the eager probe) or flex, as a
    model on a GPU would run (captured by the SDPA probe; flex cannot run sinks on the CPU)."""
    model.set_attn_implementation(request.param)
    yield request.param
    model.set_attn_implementation("eager")


# -- definitions --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "dense", "chunked"])
def test_sink_by_hand(backend):
    """Two keys with equal scores and a sink of logit 0: row 0 splits 1/2 key 0, 1/2 sink; row 1
    gives 1/3 to each key and to the sink."""
    q, k = (
        torch.zeros(1, 1, 2, 4, dtype=torch.float64),
        torch.zeros(1, 1, 2, 4, dtype=torch.float64),
    )
    sinks = torch.zeros(1, dtype=torch.float64)
    if backend == "reference":
        r = reference_stats(q, k, sinks=sinks, fai_horizon=(1, 1))
        rows, cols, lse = r.rows, r.cols, r.lse
    else:
        got = kernels.attention_stats(q, k, sinks=sinks, fai_horizon=(1, 1), backend=backend)
        rows, cols, lse = got.rows, got.cols, got.lse
    assert rows["sink_logit_mass"].flatten().tolist() == pytest.approx([1 / 2, 1 / 3])
    assert rows["entropy"].flatten().tolist() == pytest.approx([math.log(2), math.log(3)])
    assert rows["sink_mass"].flatten().tolist() == pytest.approx([1 / 2, 1 / 3])
    assert rows["max_attention"].flatten().tolist() == pytest.approx([1 / 2, 1 / 3])
    assert rows["mean_distance"].flatten().tolist() == pytest.approx([0.0, 1 / 3])
    assert cols["received"].flatten().tolist() == pytest.approx([5 / 6, 1 / 3])
    assert cols["sink_score"].flatten().tolist() == pytest.approx([5 / 12, 1 / 3])
    assert cols["fai"].flatten()[0].item() == pytest.approx(1 / 3)
    assert lse.flatten().tolist() == pytest.approx([math.log(2), math.log(3)])


def test_sink_metric_only_with_sinks():
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    assert "sink_logit_mass" not in kernels.attention_stats(q, k).rows
    assert "sink_logit_mass" in kernels.attention_stats(q, k, sinks=[0.5, -1.0]).rows
    with pytest.raises(UnsupportedMetricError, match="sink_logit_mass needs learned sink logits"):
        kernels.attention_stats(q, k, metrics=["entropy", "sink_logit_mass"])


@pytest.mark.parametrize(
    ("sinks", "message"),
    [
        (torch.zeros(3), r"sinks must be \[Hq\] = \[2\] learned sink logits.*got \(3,\)"),
        (torch.zeros(1, 2), r"sinks must be \[Hq\] = \[2\].*got \(1, 2\)"),
        (torch.tensor([0.0, math.inf]), r"sinks \(2,\) holds 1 NaN or inf value"),
        (torch.tensor([1, 2]), "sinks must be floating point logits, got torch.int64"),
    ],
    ids=["heads", "2-d", "inf", "int"],
)
def test_bad_sinks(sinks, message):
    with pytest.raises(ShapeError, match=message):
        build_request(torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), sinks=sinks)


def test_backend_without_sinks_names_them():
    req = build_request(torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), sinks=[0.0, 1.0])
    caps = Capabilities(devices=frozenset(), fast_on=frozenset(), sinks=False)
    assert Backend("x", kernels.BACKENDS["dense"].run, caps, "").lacks(req) == ["learned sinks"]
    assert kernels.BACKENDS["dense"].lacks(req) == kernels.BACKENDS["chunked"].lacks(req) == []
    triton = kernels.BACKENDS.get("triton")
    if triton is not None and not triton.capabilities.sinks:
        with pytest.raises(UnsupportedMetricError, match="learned sinks"):
            kernels.attention_stats(req.q, req.k, sinks=req.sinks, backend="triton")


# -- capture of a tiny gpt-oss --------------------------------------------------------------------
def test_forward_matches_eager(model, implementation):
    ids = prompt_ids(20)
    with torch.no_grad(), asc.capture(model) as cap:
        model(input_ids=ids)
    trace = cap.trace
    assert trace.meta["backend"] == "chunked"
    assert "sink_logit_mass" in trace.meta["metrics"]
    attn = torch.stack(eager_attentions(model, input_ids=ids))[:, 0]  # [L, H, T, T]
    assert float(attn.sum(-1).max()) < 1 - 1e-3  # the sinks take a visible share
    assert_trace_matches_sinks(trace, attn)


def test_logits_and_generation_untouched(model, implementation):
    """Under capture the logits equal a plain eager run bit for bit: the eager probe delegates to
    the module's eager function, the SDPA probe computes sink layers with that same function."""
    ids = prompt_ids(16, seed=1)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        plain_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.set_attn_implementation(implementation)
    with torch.no_grad(), asc.capture(model):
        captured = model(input_ids=ids).logits
        captured_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(plain, captured)
    assert torch.equal(plain_gen, captured_gen)


def test_generate_matches_one_eager_pass(model, implementation):
    ids = prompt_ids(12, seed=2)
    with torch.no_grad(), asc.capture(model) as cap:
        out = model.generate(ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
        seq = out.sequences
        model(input_ids=seq[:, -1:], past_key_values=out.past_key_values)  # last token's row
    trace = cap.trace
    assert trace.token_ids == seq[0].tolist()
    attn = torch.stack(eager_attentions(model, input_ids=seq))[:, 0]
    assert_trace_matches_sinks(trace, attn)


def test_padded_batch_matches_each_sequence_alone(model):
    long, short = prompt_ids(18, seed=3), prompt_ids(11, seed=4)
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), asc.capture(model) as cap:
        model(input_ids=ids, attention_mask=mask, position_ids=positions)
    for trace, seq in zip(cap.traces(), (long, short), strict=True):
        attn = torch.stack(eager_attentions(model, input_ids=seq))[:, 0]
        assert_trace_matches_sinks(trace, attn)


def test_kept_queries_and_keys_rebuild_eager_attention(model, tmp_path):
    """The sink logits travel with kept q/k (trace meta), so tiles equal the eager attention."""
    ids = prompt_ids(10, seed=5)
    with torch.no_grad(), asc.capture(model, keep_qk=True) as cap:
        out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    trace = cap.trace
    n = len(trace)
    trace.save(tmp_path / "run")
    meta = asc.Trace.load(tmp_path / "run").meta["qk_attention"]
    attentions = eager_attentions(model, input_ids=out.sequences[:, :n])
    for layer, attn in enumerate(attentions):
        params = meta[str(layer)]
        sinks = model.model.layers[layer].self_attn.sinks
        assert params["sinks"] == sinks.tolist()
        assert params["sliding_window"] == (WINDOW if layer == 0 else None)
        q, k = asc.Trace.load_qk(tmp_path / "run", layer)
        for head in range(trace.n_heads):
            tile = attention_tile(q, k, head, (0, n), (0, n), **params)
            torch.testing.assert_close(tile, attn[0, head], atol=1e-5, rtol=1e-5)


def test_sdpa_probe_fallback_keeps_the_causal_mask():
    """The SDPA probe computes softcap (and sink) layers with the eager function; where SDPA would
    get no mask and apply ``is_causal`` (a prompt without padding), the fallback must build that
    causal mask, or the full-attention layers attend to the future (tiny Gemma-2, flex on a GPU)."""
    config = Gemma2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=WINDOW,
        attn_logit_softcapping=5.0,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    ids = prompt_ids(16, seed=7)
    with torch.no_grad():
        plain = model(input_ids=ids).logits  # eager
        model.set_attn_implementation("flex_attention")
        with asc.capture(model):
            captured = model(input_ids=ids).logits
    assert torch.equal(plain, captured)
