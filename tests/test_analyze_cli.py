"""analyze() and the `attnscope` command line on a tiny model."""

import pytest
import torch
from reference import assert_trace_matches, eager_attentions

import attnscope as asc
from attnscope.cli import main
from attnscope.errors import AttnscopeError


@pytest.fixture(scope="module")
def lm(cache_dir):
    return asc.load("tiny-llama")


def test_analyze_with_generation_matches_eager(lm):
    trace = asc.analyze(lm, "The cat sat on the mat because", generate=12, progress=False)
    n_prompt = len(lm.tokenizer("The cat sat on the mat because").input_ids)
    assert trace.spans["prompt"] == (0, n_prompt)
    assert trace.spans["response"] == (n_prompt, len(trace))
    assert len(trace) == n_prompt + 12
    assert trace.meta["backend"] == "chunked" and trace.meta["model"] == "tiny-llama"
    attn = torch.stack(eager_attentions(lm.model, input_ids=torch.tensor([trace.token_ids])))[:, 0]
    assert_trace_matches(trace, attn)


def test_analyze_fai_on_response_rows(lm):
    trace = asc.analyze(
        lm,
        "one two three four five six",
        generate=20,
        fai_rows="response",
        fai_horizon=(1, 5),
        progress=False,
    )
    attn = torch.stack(eager_attentions(lm.model, input_ids=torch.tensor([trace.token_ids])))[:, 0]
    expected = asc.metrics.fai(attn, horizon=(1, 5), rows=trace.spans["response"])
    torch.testing.assert_close(trace.cols["fai"], expected, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_analyze_errors(lm):
    with pytest.raises(AttnscopeError, match="longer than"):
        asc.analyze(lm, "hello", generate=10**6, progress=False)
    with pytest.raises(ValueError, match="generate"):
        asc.analyze(lm, "hello", generate=-1)


def test_unknown_alias_fails_fast_with_the_list():
    with pytest.raises(AttnscopeError, match="Known aliases: gemma3-270m"):
        asc.load("no-such-model")


def test_uncached_hf_id_fails_fast_offline():
    import time

    start = time.perf_counter()
    with pytest.raises(AttnscopeError, match="not in the local Hugging Face cache"):
        asc.load("attnscope-test/definitely-not-cached")
    assert time.perf_counter() - start < 5


def test_cli_analyze_models_query(cache_dir, tmp_path, capsys):
    out = tmp_path / "runs" / "r1"
    args = [
        "analyze",
        "--model",
        "tiny-gpt2",
        "--prompt",
        "a b c d e",
        "--generate",
        "4",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert str(out / "stats.parquet") in printed and "report.html" in printed
    assert (out / "report.html").read_text().count("plotly") > 10
    trace = asc.Trace.load(out)
    assert trace.spans["response"][1] == len(trace)

    assert main(args) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()

    assert main([*args, "--overwrite", "--keep-qk", "0,1"]) == 0
    capsys.readouterr()
    q, k = asc.Trace.load_qk(out, 1)
    assert q.shape[1] == k.shape[1] == len(asc.Trace.load(out))

    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "gemma3-270m" in listing and "whisper-tiny-en" in listing

    assert (
        main(["query", str(tmp_path / "runs"), "SELECT count(DISTINCT layer) AS n FROM stats"]) == 0
    )
    assert capsys.readouterr().out.split() == ["n", str(len(trace.layers))]
    assert main(["analyze", "--model", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "Known aliases" in capsys.readouterr().err
