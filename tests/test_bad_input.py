"""Bad input to analyze, capture and attention_stats: clear errors, never tracebacks or silence."""

import copy
import dataclasses
import json
import math

import pytest
import torch
from tokenizers import normalizers
from transformers import WhisperConfig, WhisperForConditionalGeneration

import attnscope as asc
from attnscope import kernels
from attnscope.cli import main
from attnscope.corpus import prompt_list, read_prompts
from attnscope.errors import AttnscopeError, ShapeError
from attnscope.kernels.request import build_request

LAYER_RANGE = r"GPT2LMHeadModel's layers 0-1 \(2 layers\)"


@pytest.fixture(scope="module")
def lm(cache_dir):
    return asc.load("tiny-gpt2")


def cli_error(capsys, *args: str) -> str:
    """Run the CLI, expect exit status 2 and one `attnscope: error:` line; return that line."""
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("attnscope: error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


# -- 1. texts -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("", r"the prompt must be a non-empty string, got ''"),
        (None, r"the prompt must be a non-empty string, got None"),
        # what Python makes of the argv bytes b"\xff\xfe": surrogate escapes
        ("\udcff\udcfe", r"character 0 is the lone surrogate U\+DCFF \(the byte 0xFF, not UTF-8\)"),
        ("ok \ud83d", r"not valid Unicode: character 3 is the lone surrogate U\+D83D;"),
    ],
    ids=["empty", "none", "argv-bytes", "half-pair"],
)
def test_analyze_refuses_text_no_tokenizer_takes(lm, text, message):
    with pytest.raises(AttnscopeError, match=message):
        asc.analyze(lm, text, progress=False)


def test_analyze_refuses_a_prompt_of_no_tokens(lm):
    tok = copy.deepcopy(lm.tokenizer)
    tok.backend_tokenizer.normalizer = normalizers.Strip()  # as tokenizers that strip whitespace
    stripping = dataclasses.replace(lm, tokenizer=tok)
    assert tok("   ").input_ids == [] and tok(" a ").input_ids == tok("a").input_ids
    with pytest.raises(AttnscopeError, match="gives no token with the tokenizer of 'tiny-gpt2'"):
        asc.analyze(stripping, "   ", progress=False)
    assert len(asc.analyze(stripping, " a b ", progress=False)) == 2


def test_analyze_refuses_spans_outside_the_run(lm):
    n = len(lm.tokenizer("one two three").input_ids)
    with pytest.raises(AttnscopeError, match=rf"span 'x' = \[2, {n + 3}\) is outside .* {n + 2} "):
        asc.analyze(lm, "one two three", generate=2, spans={"x": (2, n + 3)}, progress=False)
    trace = asc.analyze(lm, "one two three", generate=2, spans={"x": (2, n + 2)}, progress=False)
    assert trace.spans["x"] == (2, n + 2) and trace.rows["span_mass:x"].shape[-1] == n + 2


def test_corpus_prompts_refuse_invalid_unicode(tmp_path):
    with pytest.raises(AttnscopeError, match=r"prompt 1: \"prompt\" is not valid Unicode"):
        prompt_list(["fine", "bad \udcff"])
    with pytest.raises(AttnscopeError, match=r"prompt 0: the id is not valid Unicode"):
        prompt_list([("\udcfe", "fine")])
    file = tmp_path / "prompts.jsonl"
    file.write_text('{"prompt": "fine"}\n{"prompt": "bad \\udcff"}\n', encoding="utf-8")
    with pytest.raises(AttnscopeError, match=r"line 2: \"prompt\" is not valid Unicode.*0xFF"):
        read_prompts(file)
    assert prompt_list(["fine", ("x", "héllo ✓")]) == [("0", "fine"), ("x", "héllo ✓")]


@pytest.mark.parametrize(
    "prompt, message",
    [("", "must be a non-empty string"), ("\udcff\udcfe", "the lone surrogate U+DCFF")],
    ids=["empty", "argv-bytes"],
)
def test_cli_refuses_bad_prompts_in_one_line(lm, capsys, tmp_path, prompt, message):
    out = tmp_path / "x"
    line = cli_error(
        capsys, "analyze", "--model", "tiny-gpt2", "--prompt", prompt, "--out", str(out)
    )
    assert message in line
    assert not out.exists()


def test_cli_refuses_a_corpus_file_with_invalid_unicode(capsys, tmp_path):
    file = tmp_path / "prompts.jsonl"
    file.write_text(json.dumps({"prompt": "x \udcff"}) + "\n", encoding="utf-8")
    line = cli_error(capsys, "analyze", "--prompts", str(file), "--out", str(tmp_path / "c"))
    assert "line 1" in line and "not valid Unicode" in line


# -- 2. layer indices ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[0, 9]), rf"^layers \[9\] not in {LAYER_RANGE}$"),
        (dict(keep_qk=[7]), rf"^keep_qk \[7\] not in {LAYER_RANGE}$"),
        (dict(keep_qk=[-1]), rf"^keep_qk \[-1\] not in {LAYER_RANGE} \(indices start at 0\)$"),
        (dict(layers=[-2, 1]), r"layers \[-2\] not in .*indices start at 0"),
        (dict(layers=[]), rf"layers is empty: give indices from {LAYER_RANGE}, or None for all"),
        (dict(layers=[0], keep_qk=[1]), r"keep_qk \[1\] are not among the captured layers \[0\]"),
    ],
    ids=[
        "layers",
        "keep_qk",
        "keep_qk-negative",
        "layers-negative",
        "no-layers",
        "qk-not-captured",
    ],
)
def test_layers_the_model_lacks_are_refused(lm, kwargs, message):
    with pytest.raises(AttnscopeError, match=message):
        asc.analyze(lm, "one two three", progress=False, **kwargs)
    with pytest.raises(AttnscopeError, match=message):
        asc.capture(lm.model, **kwargs)  # at once, not after the model ran


def test_existing_layers_are_captured(lm):
    trace = asc.analyze(lm, "one two three", layers=[1], keep_qk=[1], progress=False)
    assert trace.layers == [1] and list(trace.qk) == [1]


def test_layers_of_stacks_of_different_depths():
    config = WhisperConfig(
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        d_model=16,
        encoder_layers=1,
        decoder_layers=3,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=8,
        max_source_positions=8,
        max_target_positions=8,
    )
    model = WhisperForConditionalGeneration(config)
    assert asc.capture(model, layers=[2]).config.layers == (2,)  # a decoder layer
    with pytest.raises(AttnscopeError, match=r"layers \[3\] not in .*'s layers 0-0 \(encoder\)"):
        asc.capture(model, layers=[0, 3])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--keep-qk", "7"], "--keep-qk 7: the model has 2 layers (0 to 1)"),
        (["--keep-qk", "-1"], "indices start at 0"),
        (["--layers", "0,9"], "--layers 0,9: the model has 2 layers (0 to 1)"),
    ],
    ids=["keep-qk", "keep-qk-negative", "layers"],
)
def test_cli_refuses_layers_the_model_lacks(lm, capsys, tmp_path, flags, message):
    out = tmp_path / "x"
    args = ["analyze", "--model", "tiny-gpt2", "--prompt", "hi", "--out", str(out), *flags]
    assert message in cli_error(capsys, *args)
    assert not out.exists()


# -- 3. attention_stats -------------------------------------------------------------------------
def qk(tq: int = 5, tk: int = 5, d: int = 16, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 2, tq, d, **kw), torch.randn(1, 2, tk, d, **kw)


@pytest.mark.parametrize("backend", sorted(kernels.BACKENDS))
def test_no_queries_give_empty_rows_and_unattended_columns(backend):
    q, k = qk(tq=0, tk=5)
    stats = kernels.attention_stats(q, k, backend=backend, causal=False)
    assert stats.rows["entropy"].shape == (1, 2, 0)
    assert torch.equal(stats.cols["received"], torch.zeros(1, 2, 5))  # nobody attends
    assert stats.cols["fai"].isnan().all() and stats.cols["sink_score"].isnan().all()


@pytest.mark.parametrize("tq", [0, 3])
def test_no_keys_are_refused(tq):
    q, k = qk(tq=tq, tk=0)
    with pytest.raises(ShapeError, match=r"k \(1, 2, 0, 16\) has no key \(Tk = 0\)"):
        kernels.attention_stats(q, k)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda q, k: (q.to(torch.complex64), k.to(torch.complex64)), "must be floating point"),
        (lambda q, k: (q, k.half()), "one dtype, got torch.float32 and torch.float16"),
        (lambda q, k: (q.double(), k), "one dtype, got torch.float64 and torch.float32"),
        (lambda q, k: (q, k.to("meta")), "one device, got q on cpu and k on meta"),
    ],
    ids=["complex", "half-key", "double-query", "device"],
)
def test_query_and_key_must_agree(make, message):
    with pytest.raises(ShapeError, match=message):
        kernels.attention_stats(*make(*qk()))


@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_queries_or_keys_are_refused(which, value):
    q, k = qk()
    (q if which == "q" else k)[0, 1, 3, 2] = value
    with pytest.raises(ShapeError, match=rf"^{which} .* 1 NaN or inf value\(s\).*\(0, 1, 3, 2\)"):
        kernels.attention_stats(q, k)


def test_finite_values_whose_sum_overflows_pass():
    q = torch.full((1, 1, 2, 4), 3e38)  # the fast check's sum is inf; every value is finite
    assert build_request(q, q).q is q


@pytest.mark.parametrize(
    "span, k_pos, message",
    [
        ((-2, 3), None, r"span 'a' = \[-2, 3\) is outside \[0, 5\] \(Tk = 5 key positions\)"),
        ((7, 9), None, r"span 'a' = \[7, 9\) is outside \[0, 5\]"),
        ((3, 6), None, r"span 'a' = \[3, 6\) is outside \[0, 5\]"),
        ((-1, 2), torch.arange(5), r"span 'a' = \[-1, 2\) is outside key positions >= 0"),
    ],
    ids=["negative", "beyond", "past-the-end", "negative-explicit-positions"],
)
def test_spans_outside_the_keys_are_refused(span, k_pos, message):
    q, k = qk()
    with pytest.raises(ShapeError, match=message):
        kernels.attention_stats(q, k, spans={"a": span}, k_pos=k_pos)


def test_spans_ahead_of_explicit_positions_are_allowed():
    """The prompt's forward pass of a generation sees a response span with no key yet."""
    q, k = qk()
    stats = kernels.attention_stats(q, k, spans={"resp": (5, 9)}, k_pos=torch.arange(5))
    assert torch.equal(stats.rows["span_mass:resp"], torch.zeros(1, 2, 5))
    full = kernels.attention_stats(q, k, spans={"all": (0, 5)})
    torch.testing.assert_close(full.rows["span_mass:all"], torch.ones(1, 2, 5))


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(1, 1, 5, 4, dtype=torch.bool), r"\[1, 1\|2, 5, 5\]; got \(1, 1, 5, 4\)"),
        (torch.ones(1, 1, 4, 5, dtype=torch.bool), r"\[1, 1\|2, 5, 5\]; got \(1, 1, 4, 5\)"),
        (torch.ones(1, 3, 5, 5, dtype=torch.bool), r"got \(1, 3, 5, 5\)"),
        (torch.ones(1, 5, 5, dtype=torch.bool), r"got \(1, 5, 5\)"),
        (
            torch.ones(1, 4, dtype=torch.bool),
            r"2-D mask must be \[B, Tk\] = \(1, 5\), got \(1, 4\)",
        ),
        (torch.ones(1, 5, dtype=torch.complex64), "bool, integer or float, got torch.complex64"),
        (torch.ones(1, 5, dtype=torch.bool, device="meta"), "device of q \\(cpu\\), got meta"),
    ],
    ids=["4d-tk", "4d-tq", "4d-heads", "3d", "2d", "complex", "device"],
)
def test_bad_masks_are_refused(mask, message):
    with pytest.raises(ShapeError, match=message):
        kernels.attention_stats(*qk(), mask=mask)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scale=math.nan), "scale must be finite, got nan"),
        (dict(softcap=math.inf), "softcap must be finite and > 0, got inf"),
    ],
)
def test_non_finite_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kernels.attention_stats(*qk(), **kwargs)


# -- 4. one capture, one sequence ---------------------------------------------------------------
def test_two_forwards_in_one_capture_are_refused_not_concatenated(lm):
    a, b = torch.randint(5, 200, (2, 1, 10))
    with torch.no_grad(), asc.capture(lm.model) as outer, asc.capture(lm.model) as inner:
        lm.model(input_ids=a)
        lm.model(input_ids=b)
    for cap in (outer, inner):
        with pytest.raises(AttnscopeError, match="more than one independent forward pass"):
            cap.traces()


def test_generate_in_one_capture_is_one_sequence(lm):
    ids = torch.randint(5, 200, (1, 10))
    with torch.no_grad(), asc.capture(lm.model) as cap:
        out = lm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
        )
    seen = out[:, :-1]  # the last generated token is never fed back
    with torch.no_grad(), asc.capture(lm.model) as whole:
        lm.model(input_ids=seen)
    assert len(cap.trace) == seen.shape[1] == 14 and cap.trace.token_ids == seen[0].tolist()
    for name in ("entropy", "waad"):
        torch.testing.assert_close(cap.trace.rows[name], whole.trace.rows[name])
