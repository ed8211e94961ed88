"""The verifiable arithmetic task of the real-policy RL benchmark and a tiny GRPO run on it
(benchmarks/rl_real.py trains SmolLM2-135M-Instruct the same way)."""

import pytest
import torch

import attnscope as asc
from attnscope.errors import AttnscopeError
from attnscope.findings.problems import two_step_problems
from attnscope.rl import GRPOConfig, GRPOTrainer
from attnscope.rl.arithmetic import ArithmeticTask, step_reward


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return asc.load("tiny-llama")


def test_step_reward_checks_the_first_step_and_the_answer():
    p = two_step_problems(1, seed=3)[0]  # a + b - c
    (a, _, b, _, mid), (_, _, c, _, answer) = (s.split() for s in p.steps)
    assert int(answer) == p.answer
    full = f"{a} + {b} = {mid}, then {mid} - {c} = {answer}. The answer is {answer}."
    assert step_reward(p, full) == 1.0
    assert step_reward(p, f"{a} + {b} = {mid}, so {int(answer) + 1}") == 0.5  # step right only
    assert step_reward(p, f"It is {answer}.") == 0.5 + 0.5 * (int(mid) == p.answer)
    assert step_reward(p, f"{answer} is it, or {int(answer) + 1}") == 0.0  # last number counts
    assert step_reward(p, "I do not know") == 0.0


def test_task_prompts_follow_the_chat_choice(tiny):
    problems = two_step_problems(3)
    plain = ArithmeticTask(tiny.tokenizer, problems, chat=False)
    assert plain.prompts == [p.prompt for p in problems]
    mid = float(problems[0].steps[0].split()[-1])
    completions = [f"so {problems[0].answer}", "no idea"]
    assert plain.reward(plain.prompts[:2], completions) == [
        0.5 + 0.5 * (mid == problems[0].answer),
        0.0,
    ]
    assert plain.solved(plain.prompts[:2], completions) == [True, False]
    with pytest.raises(AttnscopeError, match="no chat template"):
        ArithmeticTask(tiny.tokenizer, problems)


def test_tiny_grpo_run_on_the_arithmetic_task(tiny, one_thread):
    task = ArithmeticTask(tiny.tokenizer, two_step_problems(6, seed=5), chat=False)
    batches = list(task.batches(2, 2, seed=0))
    assert batches == list(task.batches(2, 2, seed=0)) and all(len(b) == 2 for b in batches)
    model = tiny.model
    before = [p.detach().clone() for p in model.parameters()]
    # long enough for FAI (horizon 10-100 tokens ahead) to mark anchors
    config = GRPOConfig(group_size=2, max_new_tokens=24, lr=1e-3, strategy="coupled")
    logs = GRPOTrainer(model, tiny.tokenizer, task.reward, config).train(batches, progress=False)
    assert [log.step for log in logs] == [0, 1]
    for log in logs:
        assert 0.0 <= log.reward <= 1.0 and 0 < log.credit_overhead_pct < 100
        assert min(log.sample.gamma) == 1.0 and log.boosted > 0  # coupled credit boosts tokens
    # AdamW's weight decay moves the weights even when every advantage is 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert 0.0 <= task.accuracy(model, tiny.tokenizer, max_new_tokens=4) <= 1.0
