"""Corpus runs: batched statistics equal analyze() per prompt (also fused), kill/resume, failures,
RunStore."""

import html
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from filelock import FileLock

import attnscope as asc
from attnscope import corpus
from attnscope.atomic import lock_file
from attnscope.cli import main
from attnscope.corpus_report import corpus_head_stats, write_corpus_report
from attnscope.errors import AttnscopeError, RunExistsError
from attnscope.store import RunStore

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "The cat sat on the mat because it was",
    "Paris",
    "What is the capital of France? Paris is. Which number comes after 99? It is 100.",
    "Some heads look at the previous token; others look back at the first token of the text",
    "one two three",
]
GENERATE = 8


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def lm(request, cache_dir):
    return asc.load(request.param)


@pytest.fixture(scope="module")
def gpt2(cache_dir):
    return asc.load("tiny-gpt2")


def stored(out) -> list[str]:
    """Ids of the finished prompts of a corpus run (temporary directories excluded)."""
    prompts = out / "prompts"
    if not prompts.is_dir():
        return []
    return sorted(p.name for p in prompts.iterdir() if not p.name.startswith("."))


def assert_same_trace(got: asc.Trace, ref: asc.Trace, atol: float) -> None:
    assert got.token_ids == ref.token_ids and got.spans == ref.spans
    assert set(got.rows) == set(ref.rows) and set(got.cols) == set(ref.cols)
    for table, ref_table in ((got.rows, ref.rows), (got.cols, ref.cols)):
        for name, value in table.items():
            torch.testing.assert_close(value, ref_table[name], atol=atol, rtol=0, equal_nan=True)


# -- exact statistics with batching ------------------------------------------------------------
def test_each_prompt_equals_analyze_alone(lm, tmp_path, monkeypatch):
    """Different prompt lengths (left padding) and one response that ends early at its
    end-of-sequence token while the rest of its batch goes on generating."""
    n_paris = len(lm.tokenizer(TEXTS[1]).input_ids)
    alone = asc.analyze(lm, TEXTS[1], generate=GENERATE, progress=False)
    eos = alone.token_ids[n_paris + 2]  # make a token this response produces the end of sequence
    monkeypatch.setattr(lm.model.generation_config, "eos_token_id", eos)

    summary = asc.analyze_corpus(
        lm, TEXTS, generate=GENERATE, out=tmp_path / "c", batch_size=3, progress=False
    )
    assert summary.done == ["0", "1", "2", "3", "4"] and summary.skipped == {}
    full = []
    for i, text in enumerate(TEXTS):
        got = asc.Trace.load(tmp_path / "c" / "prompts" / str(i))
        assert_same_trace(got, asc.analyze(lm, text, generate=GENERATE, progress=False), 1e-4)
        assert got.meta["prompt_id"] == str(i) and got.meta["text"] == text
        full.append(len(got) == len(lm.tokenizer(text).input_ids) + GENERATE)
    paris = asc.Trace.load(tmp_path / "c" / "prompts" / "1")
    assert paris.token_ids[-1] == eos and not full[1]  # cut after the first end of sequence
    assert full[0] and full[4]  # its batch (the three shortest prompts) went on


def test_fai_on_response_rows_batches_equal_lengths(gpt2, tmp_path):
    texts = ["a b c d", "e f g h", "one two three four five six", "x y z w"]
    summary = asc.analyze_corpus(
        gpt2, texts, generate=6, out=tmp_path / "c", fai_rows="response", progress=False
    )
    assert len(summary.done) == 4
    for i, text in enumerate(texts):
        ref = asc.analyze(gpt2, text, generate=6, fai_rows="response", progress=False)
        got = asc.Trace.load(tmp_path / "c" / "prompts" / str(i))
        assert got.meta["fai_rows"] == list(ref.meta["fai_rows"])
        assert_same_trace(got, ref, 1e-4)
    with pytest.raises(ValueError, match="fai_rows"):
        asc.analyze_corpus(gpt2, texts, out=tmp_path / "d", fai_rows="prompt")


def assert_fused_matches(got: asc.Trace, ref: asc.Trace) -> None:
    """``got`` (fused forward) has ``ref``'s (default capture) tokens and statistics within
    1e-4 relative, and says where its attention output came from."""
    assert got.token_ids == ref.token_ids and got.spans == ref.spans
    assert got.meta["stats_config"]["exact_logits"] is False
    assert ref.meta["stats_config"]["exact_logits"] is True
    assert "fused forward" in got.meta["backend_reason"]
    assert "fused forward" not in ref.meta["backend_reason"]
    for table, ref_table in ((got.rows, ref.rows), (got.cols, ref.cols)):
        assert set(table) == set(ref_table)
        for name, value in table.items():
            torch.testing.assert_close(value, ref_table[name], rtol=1e-4, atol=1e-6, equal_nan=True)


def test_fused_corpus_equals_the_default_corpus(lm, tmp_path):
    """exact_logits=False: every batch's captured forward is the fused one (left padding,
    generated responses), with the default run's statistics."""
    runs = {}
    for exact in (True, False):
        out = tmp_path / str(exact)
        summary = asc.analyze_corpus(
            lm, TEXTS, GENERATE, out=out, batch_size=3, exact_logits=exact, progress=False
        )
        assert summary.done == ["0", "1", "2", "3", "4"] and summary.skipped == {}
        runs[exact] = [asc.Trace.load(out / "prompts" / str(i)) for i in range(len(TEXTS))]
    for got, ref in zip(runs[False], runs[True], strict=True):
        assert_fused_matches(got, ref)


def test_fused_corpus_manifest_resume_and_cli(gpt2, tmp_path, capsys):
    """corpus.json records exact_logits only when False (runs that recorded the default or
    predate the option resume); a resume with the other value is refused; the CLI's --fused
    takes --prompts."""
    texts, default, fused = ["a b", "c d e"], tmp_path / "runs" / "default", tmp_path / "runs" / "f"
    asc.analyze_corpus(gpt2, texts, out=default, progress=False)
    manifest = json.loads((default / "corpus.json").read_text())
    assert "exact_logits" not in manifest["parameters"]  # as written before the option
    with pytest.raises(RunExistsError, match=r"differs: exact_logits=True \(now False\)\. Resume"):
        asc.analyze_corpus(gpt2, texts, out=default, exact_logits=False, progress=False)
    manifest["parameters"]["exact_logits"] = True  # as recorded by earlier versions
    (default / "corpus.json").write_text(json.dumps(manifest))
    assert asc.analyze_corpus(gpt2, texts, out=default, progress=False).resumed == ["0", "1"]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    args = ["analyze", "--model", "tiny-gpt2", "--prompts", str(prompts), "--out", str(fused)]
    assert main([*args, "--fused"]) == 0
    assert "2 prompts done, 0 skipped" in capsys.readouterr().out
    assert json.loads((fused / "corpus.json").read_text())["parameters"]["exact_logits"] is False
    for i in range(len(texts)):
        got = asc.Trace.load(fused / "prompts" / str(i))
        assert_fused_matches(got, asc.Trace.load(default / "prompts" / str(i)))
    assert main([*args, "--fused"]) == 0
    assert "2 prompts done (2 from an earlier run), 0 skipped" in capsys.readouterr().out
    assert main(args) == 2
    assert "differs: exact_logits=False (now True)" in capsys.readouterr().err


# -- interruption and failures -------------------------------------------------------------------
def test_killed_cli_run_resumes_to_the_uninterrupted_result(gpt2, cache_dir, tmp_path, capsys):
    n = 120  # 60 batches of 2 (about 1 s), so the kill lands mid-run
    words = TEXTS[3].split()
    lines = [
        json.dumps({"prompt": " ".join(words[: 3 + i % 15]) + f" {i}", "id": f"q{i:03d}"})
        for i in range(n)
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "runs" / "corpus"
    args = ["analyze", "--model", "tiny-gpt2", "--prompts", str(prompts), "--generate", "8"]
    args += ["--batch-size", "2", "--out", str(out)]
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "attnscope.cli", *args],
            env={**os.environ, "ATTNSCOPE_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        deadline = time.monotonic() + 120
        while not stored(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.kill()
    assert proc.wait() == -signal.SIGKILL, log.read_text()  # killed, not finished or failed
    partial = stored(out)
    assert 0 < len(partial) < n, f"not killed mid-run ({len(partial)} of {n}): {log.read_text()}"
    assert json.loads((out / "corpus.json").read_text())["failed"] == {}

    assert main(args) == 0  # the same command again resumes
    printed = capsys.readouterr().out
    assert f"{n} prompts done ({len(partial)} from an earlier run), 0 skipped" in printed
    assert "attnscope query" in printed and "WHERE run = 'corpus'" in printed
    assert len(stored(out)) == n

    asc.analyze_corpus(
        gpt2,
        corpus.read_prompts(prompts),
        generate=8,
        out=tmp_path / "runs" / "whole",
        batch_size=2,
        progress=False,
    )
    store = RunStore(tmp_path / "runs")
    per_prompt = store.sql(
        "SELECT count(*) AS n, count(DISTINCT prompt) AS prompts FROM runs WHERE run = 'corpus'"
    )
    assert per_prompt.to_pylist() == [{"n": n, "prompts": n}]
    metrics = ["entropy", "mean_distance", "waad", "sink_mass", "max_attention"]
    metrics += ["received", "fai", "sink_score"]
    diffs = ", ".join(  # DuckDB: NaN = NaN; NaN against a number stays NaN and fails below
        f"max(CASE WHEN a.{m} = b.{m} THEN 0 ELSE abs(a.{m} - b.{m}) END) AS {m}" for m in metrics
    )
    table = store.sql(
        f"SELECT count(*) AS rows, count(DISTINCT a.prompt) AS prompts, {diffs} FROM stats a "
        "JOIN stats b USING (prompt, layer, head, position) "
        "WHERE a.run = 'corpus' AND b.run = 'whole' AND a.token = b.token"
    ).to_pylist()[0]
    sizes = store.sql("SELECT run, count(*) AS rows FROM stats GROUP BY run ORDER BY run")
    assert sizes.column("rows").to_pylist() == [table["rows"]] * 2  # each row exactly once
    assert table["prompts"] == n
    assert {m: table[m] for m in metrics if not table[m] <= 1e-5} == {}


def test_failing_prompts_are_skipped_recorded_and_retried(gpt2, tmp_path, monkeypatch, capsys):
    too_long = "word " * 2100  # beyond tiny-gpt2's 2048 positions
    prompts = [
        {"prompt": "a short one", "id": "ok"},
        {"prompt": too_long, "id": "long"},
        {"prompt": "explode here", "id": "boom"},
        {"prompt": "another one", "id": "ok2"},
    ]
    label_run = corpus.label_run

    def exploding(trace, lm, n_prompt, text, start):
        if text == "explode here":
            raise RuntimeError("boom")
        return label_run(trace, lm, n_prompt, text, start)

    monkeypatch.setattr(corpus, "label_run", exploding)
    out = tmp_path / "c"
    summary = asc.analyze_corpus(gpt2, prompts, generate=4, out=out, batch_size=1, progress=False)
    assert summary.done == ["ok", "ok2"] and stored(out) == ["ok", "ok2"]
    assert summary.skipped["boom"] == "RuntimeError: boom"
    assert "longer than the context of 'tiny-gpt2' (2048 tokens)" in summary.skipped["long"]
    manifest = json.loads((out / "corpus.json").read_text())
    assert manifest["failed"] == summary.skipped
    assert manifest["prompts"] == ["ok", "long", "boom", "ok2"]
    err = capsys.readouterr().err
    assert "skipped prompt 'long'" in err and "skipped prompt 'boom': RuntimeError: boom" in err

    monkeypatch.setattr(corpus, "label_run", label_run)
    again = asc.analyze_corpus(gpt2, prompts, generate=4, out=out, batch_size=1, progress=False)
    assert again.resumed == ["ok", "ok2"] and again.done == ["ok", "boom", "ok2"]
    assert list(again.skipped) == ["long"]
    assert list(json.loads((out / "corpus.json").read_text())["failed"]) == ["long"]


def test_existing_out_directories(gpt2, tmp_path):
    out, texts = tmp_path / "c", ["a b", "c d e"]
    asc.analyze_corpus(gpt2, texts, out=out, progress=False)
    with pytest.raises(RunExistsError, match=r"differs: generate=0 \(now 2\)\. Resume"):
        asc.analyze_corpus(gpt2, texts, generate=2, out=out, progress=False)
    with pytest.raises(RunExistsError, match=r"differs: the prompts \(ids or texts\)"):
        asc.analyze_corpus(gpt2, ["a b", "x"], out=out, progress=False)
    with pytest.raises(RunExistsError, match=r"model 'tiny-gpt2' \(now 'tiny-llama'\)"):
        asc.analyze_corpus("tiny-llama", texts, out=out, progress=False)  # refused before loading
    summary = asc.analyze_corpus(gpt2, texts, generate=2, out=out, overwrite=True, progress=False)
    assert summary.resumed == [] and summary.done == ["0", "1"]
    assert len(asc.Trace.load(out / "prompts" / "0")) == 2 + 2

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(RunExistsError, match="not a corpus run"):
        asc.analyze_corpus(gpt2, texts, out=other, progress=False)
    with pytest.raises(AttnscopeError, match="refusing to overwrite"):
        asc.analyze_corpus(gpt2, texts, out=other, overwrite=True, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"


def test_a_second_writer_is_refused_while_the_first_holds_the_run(gpt2, tmp_path):
    out = tmp_path / "c"
    with (
        FileLock(str(lock_file(out))),  # what a running analyze_corpus holds
        pytest.raises(AttnscopeError, match="another process is writing the corpus run"),
    ):
        asc.analyze_corpus(gpt2, ["a b"], out=out, progress=False)
    assert not out.exists()
    assert asc.analyze_corpus(gpt2, ["a b"], out=out, progress=False).done == ["0"]


# -- prompt files and ids ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"prompt": "a"}', '{"prompt": "b"'], r"line 2: not valid JSON"),
        (['["a"]'], r"line 1: expected an object"),
        (['{"id": "x"}'], r'line 1: "prompt" must be a non-empty string'),
        (
            ['{"prompt": "a", "id": "x"}', "", '{"prompt": "b", "id": "x"}'],
            r"line 3: id 'x' is already used by .*line 1",
        ),
        (['{"prompt": "a"}', '{"prompt": "b", "id": "0"}'], r"line 2: id '0' is already used"),
        (['{"prompt": "a", "id": "../x"}'], r"line 1: id '../x' starts with '.'"),
        (['{"prompt": "a", "id": "a/b"}'], r"line 1: id 'a/b' contains a path separator"),
        (['{"prompt": "a", "id": ".hidden"}'], r"starts with '.'"),
        (['{"prompt": "a", "id": ""}'], r"line 1: id '' is empty"),
        (['{"prompt": "a", "id": 3}'], r"line 1: the id must be a string"),
    ],
)
def test_bad_prompt_files_name_the_line(tmp_path, lines, match):
    file = tmp_path / "p.jsonl"
    file.write_text("\n".join(lines) + "\n")
    with pytest.raises(AttnscopeError, match=match):
        corpus.read_prompts(file)


def test_prompt_ids_default_to_line_numbers_and_lists_are_checked(tmp_path, capsys):
    file = tmp_path / "p.jsonl"
    file.write_text('{"prompt": "a"}\n\n{"prompt": "b", "extra": 1}\n{"prompt": "c", "id": "z"}\n')
    assert corpus.read_prompts(file) == [("0", "a"), ("2", "b"), ("z", "c")]
    assert corpus.prompt_list(["a", ("k", "b"), {"prompt": "c"}]) == [
        ("0", "a"),
        ("k", "b"),
        ("2", "c"),
    ]
    with pytest.raises(AttnscopeError, match=r"prompt 1: id 'a/b' contains a path separator"):
        corpus.prompt_list(["a", ("a/b", "b")])
    with pytest.raises(AttnscopeError, match="no prompts"):
        corpus.prompt_list([])
    file.write_text('{"prompt": "a"}\n{"prompt": "b",\n')
    out = tmp_path / "c"
    assert main(["analyze", "--model", "tiny-gpt2", "--prompts", str(file), "--out", str(out)]) == 2
    assert f"{file} line 2: not valid JSON" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        main(["analyze", "--prompt", "a", "--prompts", str(file), "--out", str(out)])
    assert "not allowed with argument" in capsys.readouterr().err


# -- RunStore over corpus runs ------------------------------------------------------------------
def test_run_store_sees_corpus_prompts(gpt2, tmp_path):
    root = tmp_path / "root"
    asc.analyze_corpus(
        gpt2, [("p1", "one two"), ("p0", "three four five")], out=root / "c", progress=False
    )
    asc.analyze(gpt2, "single run", progress=False).save(root / "single")
    asc.analyze(gpt2, "outside", progress=False).save(tmp_path / "outside")
    os.symlink(tmp_path / "outside", root / "c" / "prompts" / "evil")
    store = RunStore(root)

    assert [(r.name, r.run, r.prompt) for r in store.runs()] == [
        ("c/p1", "c", "p1"),  # corpus order
        ("c/p0", "c", "p0"),
        ("single", "single", None),
    ]
    assert store.path_of("c/p0") == (root / "c" / "prompts" / "p0").resolve()
    assert store.load("c/p0").meta["prompt_id"] == "p0"
    for name in ("c/../../outside", "c/../single", "../outside", "c/evil", "c/p0/x", "c", "c/.x"):
        with pytest.raises(AttnscopeError, match="no run named"):
            store.path_of(name)
    with pytest.raises(AttnscopeError, match="no run named"):
        store.path_of("single/p0")  # not a corpus

    table = store.sql(
        "SELECT run, prompt, count(*) AS n FROM stats GROUP BY ALL ORDER BY run, prompt"
    )
    counts = {(r["run"], r["prompt"]): r["n"] for r in table.to_pylist()}
    sizes = {r.name: r.n_tokens * r.n_layers * r.n_heads for r in store.runs()}
    assert counts == {
        ("c", "p0"): sizes["c/p0"],
        ("c", "p1"): sizes["c/p1"],
        ("single", None): sizes["single"],
    }
    whole = store.sql("SELECT count(*) AS n FROM stats WHERE run = 'c'").column("n")[0].as_py()
    assert whole == sizes["c/p0"] + sizes["c/p1"]
    runs = store.sql("SELECT run, prompt, n_tokens FROM runs ORDER BY run, prompt").to_pylist()
    assert [(r["run"], r["prompt"]) for r in runs] == [("c", "p0"), ("c", "p1"), ("single", None)]

    (root / "c" / "prompts" / "p1" / "trace.json").write_text("{")
    (root / "broken").mkdir()
    (root / "broken" / "corpus.json").write_text("[]")
    with pytest.warns(UserWarning) as caught:
        names = [r.name for r in store.runs()]
    assert names == ["c/p0", "single"]
    messages = " ".join(str(w.message) for w in caught)
    assert "skipping run 'c/p1'" in messages and "skipping corpus run 'broken'" in messages
    with pytest.warns(UserWarning):  # the rest stays queryable
        table = store.sql("SELECT DISTINCT run, prompt FROM stats ORDER BY run")
    assert table.to_pylist() == [{"run": "c", "prompt": "p0"}, {"run": "single", "prompt": None}]


# -- corpus report ------------------------------------------------------------------------------
def test_corpus_report_aggregates_every_stored_prompt(gpt2, tmp_path):
    texts = [("a", "one two three four"), ("b", "five six seven"), ("c", "eight nine ten x y z")]
    out = tmp_path / "root" / "corpus"
    asc.analyze_corpus(gpt2, texts, generate=3, out=out, batch_size=2, progress=False)
    traces = [asc.Trace.load(out / "prompts" / pid) for pid, _ in texts]

    layers, panels = corpus_head_stats(out.parent, out.name)
    assert layers == traces[0].layers
    tokens = torch.cat([t.rows["mean_distance"] for t in traces], dim=-1)  # [L, H, all tokens]
    span = panels["head span (mean look-back distance)"]
    torch.testing.assert_close(span, tokens.mean(-1), atol=1e-5, rtol=1e-5)
    sinks = torch.stack([t.cols["sink_score"][..., 0] > 0.3 for t in traces]).float().mean(0)
    torch.testing.assert_close(panels["share of prompts with sink score of token 0 > 0.3"], sinks)

    (out / "prompts" / "b" / "trace.json").rename(out / "b.json")  # as if b had not been stored
    page = write_corpus_report(out).read_text()
    assert "Prompts: 2 of 3 stored" in page and "not stored: not analysed yet" in page
    assert html.escape(traces[0].meta["generated_text"][:20]) in page
