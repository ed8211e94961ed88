"""analyze() and the `attnscope` command line on a tiny model."""

import argparse
import subprocess
import sys

import pytest
import torch
from reference import assert_trace_matches, eager_attentions

import attnscope as asc
from attnscope import cli
from attnscope.cli import main
from attnscope.commands.common import parse_keep_qk, parse_layers
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


def test_cli_layers_error_before_loading(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["analyze", "--model", "nope", "--layers", "1-3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--layers '1-3': expected comma-separated layer indices and START:END" in err
    assert "Known aliases" not in err and not out.exists()


@pytest.mark.parametrize(
    ("text", "n_layers", "expected"),
    [
        ("0,3,5", None, [0, 3, 5]),
        ("2:6", None, [2, 3, 4, 5]),
        (":3", None, [0, 1, 2]),
        ("0,2:4", None, [0, 2, 3]),
        (" 5, 1 ,1", None, [1, 5]),
        ("2:", 5, [2, 3, 4]),
        ("0,3:", 5, [0, 3, 4]),
        (":", 3, [0, 1, 2]),
    ],
)
def test_parse_layers(text, n_layers, expected):
    layers = parse_layers(text)
    assert layers.open_ended == (n_layers is not None)
    assert layers.indices(n_layers) == expected


@pytest.mark.parametrize("text", ["", "a", "1-3", "1:2:3", "0,,2", "1.5", "x:2"])
def test_parse_layers_syntax_errors(text):
    with pytest.raises(ValueError, match=r"--layers .*expected comma-separated layer indices"):
        parse_layers(text)


@pytest.mark.parametrize("text", ["-1", "3:3", "4:2", "0,-2:"])
def test_parse_layers_empty_or_negative(text):
    with pytest.raises(ValueError, match="selects no layer"):
        parse_layers(text)


def test_layers_against_the_model_and_contiguous_spans():
    with pytest.raises(ValueError, match=r"--layers 0,8: the model has 8 layers \(0 to 7\)"):
        parse_layers("0,8").indices(8)
    with pytest.raises(ValueError, match="has 4 layers"):
        parse_layers("4:").indices(4)
    assert parse_layers("2:6").span(8) == (2, 6)
    assert parse_layers("2:").span(8) == (2, 8)
    assert parse_layers("3").span(8) == (3, 4)
    assert parse_layers("1,2:4").span(8) == (1, 4)
    with pytest.raises(ValueError, match="one contiguous range"):
        parse_layers("0,2").span(8)


def test_parse_keep_qk():
    assert parse_keep_qk(None) is False
    assert parse_keep_qk("all") is True
    assert parse_keep_qk("1,3:").indices(5) == [1, 3, 4]
    with pytest.raises(ValueError, match="--keep-qk 'al'"):
        parse_keep_qk("al")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_help_of_main_and_every_subcommand(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps help to the terminal width
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name, summary in cli.SUBCOMMANDS.items():  # the module docstring is the list
        assert f"  {name.ljust(10)} {summary}\n" in cli.__doc__
        assert f"  {name.ljust(10)} {summary}\n" in text
    assert list(_subcommands()) == list(cli.SUBCOMMANDS)
    for name, parser in _subcommands().items():
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert cli.SUBCOMMANDS[name] in text
        for action in parser._actions:
            assert action.help, f"{name} {action.dest} has no help text"
            shown = action.default is not None and action.default is not False
            if shown and action.option_strings and action.dest != "help":
                assert "(default: " in action.help or f"(default: {action.default})" in text
    analyze_help = " ".join(_subcommands()["analyze"].format_help().split())
    assert "--prompt PROMPT text to analyse (default: a demo word problem)" in analyze_help
    assert "(default: gemma3-270m)" in analyze_help
    assert (
        "greedy tokens to generate after the prompt; 0 analyses the prompt alone (default: 0)"
        in (analyze_help)
    )


@pytest.fixture(scope="module")
def small_runs(lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    asc.analyze(lm, "a b c d", progress=False).save(root / "r")
    return root


@pytest.mark.parametrize(
    "code",
    [
        "import attnscope",
        "import attnscope.cli",
        "from attnscope.cli import main; assert main(['models']) == 0",
        "from attnscope.cli import main; assert main(['query', sys.argv[1], 'SELECT 1 AS x']) == 0",
    ],
)
def test_light_commands_import_no_torch(code, small_runs):
    check = "heavy = {'torch', 'transformers'} & set(sys.modules); assert not heavy, heavy"
    proc = subprocess.run(
        [sys.executable, "-c", f"import sys; {code}; {check}", str(small_runs)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_lazy_public_api():
    code = (
        "import importlib, attnscope as asc; importlib.import_module('attnscope.analyze'); "
        "assert asc.analyze.__name__ == 'analyze', asc.analyze"  # the submodule keeps out
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert callable(asc.analyze) and asc.analyze.__module__ == "attnscope.analyze"
    assert asc.StatsConfig.__module__ == "attnscope.kernels.config"
    assert set(asc.__all__) <= set(dir(asc))
    assert callable(asc.metrics.waad) and callable(asc.kernels.attention_stats)
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = asc.no_such_name
