"""GRPO with attention credit: the loss, rollouts, credit from the policy's own forward vs eager
attentions (tiny Llama; Gemma-3-270M in the slow test), the trainer, the TRL adapter, the demo."""

import json

import pytest
import torch
from reference import TOL, eager_attentions

import attnscope as asc
from attnscope import metrics
from attnscope.cli import main
from attnscope.errors import AttnscopeError, ShapeError
from attnscope.rhythm import Rhythm, rhythm
from attnscope.rl import CreditConfig, gammas
from attnscope.rl.grpo import (
    CREDIT_STATS,
    GRPOConfig,
    GRPOTrainer,
    group_advantages,
    grpo_loss,
    pack,
    policy_pass,
)

STRATEGIES = ("local", "global", "coupled")


# -- loss ---------------------------------------------------------------------------------------
def plain_grpo_loss(logp, old_logp, advantages, mask, eps):
    """GRPO as usually written: one advantage per sequence, clipped ratio, token-level mean."""
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
    return (per_token * mask).sum() / mask.sum()


def loss_inputs(seed=0, b=6, w=9):
    g = torch.Generator().manual_seed(seed)
    logp = (-3 * torch.rand(b, w, generator=g)).requires_grad_()
    old_logp = logp.detach() + 0.4 * torch.randn(b, w, generator=g)  # ratios well outside 1 +- 0.2
    advantages = torch.randn(b, generator=g)
    mask = torch.rand(b, w, generator=g) > 0.3
    return logp, old_logp, advantages, mask


def test_loss_with_unit_gamma_equals_plain_grpo():
    logp, old_logp, adv, mask = loss_inputs()
    ratio = torch.exp(logp - old_logp)
    assert ((ratio < 0.8) | (ratio > 1.2))[mask].float().mean() > 0.3  # clipping is exercised
    ours = grpo_loss(logp, old_logp, adv, torch.ones_like(logp), mask, clip_eps=0.2)
    plain = plain_grpo_loss(logp, old_logp, adv, mask.float(), 0.2)
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-7)
    (g_ours,) = torch.autograd.grad(ours, logp)
    (g_plain,) = torch.autograd.grad(plain, logp)
    torch.testing.assert_close(g_ours, g_plain, rtol=0, atol=1e-7)
    assert g_ours[~mask].abs().max() == 0 and g_ours[mask].abs().max() > 0


def test_gradients_reach_only_logp():
    logp, old_logp, adv, mask = loss_inputs(1)
    old_logp.requires_grad_()
    adv.requires_grad_()
    gamma = (1 + 0.5 * (torch.rand(logp.shape) > 0.6)).requires_grad_()
    grpo_loss(logp, old_logp, adv, gamma, mask).backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
    assert old_logp.grad is None and adv.grad is None and gamma.grad is None


def test_shaped_loss_by_hand():
    logp = torch.zeros(2, 3, requires_grad=True)  # ratio 1: loss = -mean(gamma * A)
    gamma = torch.tensor([[1.0, 1.5, 1.0], [1.5, 1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[True, True, True], [False, True, True]])
    # tokens: 2, 3, 2 | (masked), -1, -1 -> -(2 + 3 + 2 - 1 - 1) / 5
    assert grpo_loss(logp, logp.detach(), adv, gamma, mask).item() == pytest.approx(-1.0)
    # positive-only shaping leaves the negative row's multiplier at 1 (it is masked anyway here)
    gamma[1, 1] = 3.0
    assert grpo_loss(logp, logp.detach(), adv, gamma, mask, sign="positive").item() == (
        pytest.approx(-1.0)
    )
    assert grpo_loss(logp, logp.detach(), adv, gamma, mask).item() == pytest.approx(-0.6)


def test_loss_rejects_bad_inputs():
    logp = torch.zeros(2, 3)
    with pytest.raises(ShapeError, match="one shape"):
        grpo_loss(logp, logp, torch.zeros(2), torch.ones(2, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ShapeError, match="advantages"):
        grpo_loss(logp, logp, torch.zeros(3), torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(AttnscopeError, match="no token"):
        grpo_loss(logp, logp, torch.zeros(2), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool))


def test_group_advantages_by_hand():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 3.0]), 3)
    # group 1: mean 1/3, unbiased std sqrt(1/3); group 2: mean 2, unbiased std sqrt(3)
    s1, s2 = (1 / 3) ** 0.5 + 1e-4, 3**0.5 + 1e-4
    expected = [2 / 3 / s1, -1 / 3 / s1, -1 / 3 / s1, -2 / s2, 1 / s2, 1 / s2]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)
    assert group_advantages(torch.ones(4), 2).tolist() == [0.0] * 4  # no signal in a tied group
    with pytest.raises(ShapeError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


# -- rollouts -----------------------------------------------------------------------------------
def test_pack_left_pads_whole_sequences():
    t = torch.tensor
    r = pack([t([1, 2]), t([3])], [t([4, 5, 6]), t([7])], pad_id=0)
    assert r.ids.tolist() == [[1, 2, 4, 5, 6], [0, 0, 0, 3, 7]]
    assert r.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert r.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 0, 1]]
    assert r.width == 3
    assert r.response_mask.tolist() == [[True, True, True], [False, False, True]]
    with pytest.raises(ShapeError, match="at least one token"):
        pack([t([1])], [t([], dtype=torch.long)], 0)


# -- credit from the policy's forward vs eager attentions ----------------------------------------
def reference_rhythm(model, ids: torch.Tensor, n_prompt: int, config: CreditConfig) -> Rhythm:
    """Rhythm of ``ids`` [T] from the dense metrics of a second, eager forward pass."""
    attn = torch.stack(eager_attentions(model, input_ids=ids[None]))[:, 0].float()  # [L, H, T, T]
    n = ids.numel()
    trace = asc.Trace(
        tokens=[str(i) for i in ids.tolist()],
        token_ids=ids.tolist(),
        spans={"prompt": (0, n_prompt), "response": (n_prompt, n)},
        layers=list(range(attn.shape[0])),
        n_heads=attn.shape[1],
        rows={
            "waad": metrics.waad(attn),
            "mean_distance": metrics.mean_distance(attn),
            "entropy": metrics.entropy(attn),
        },
        cols={"fai": metrics.fai(attn, rows=(n_prompt, n))},
    )
    return rhythm(trace, config)


def assert_same_credit(got: Rhythm, ref: Rhythm, config: CreditConfig) -> None:
    """Signals within TOL; token sets and every strategy's multipliers exactly equal."""
    assert got.layers == ref.layers
    for name in ("waad", "fai", "entropy", "delta"):
        torch.testing.assert_close(
            getattr(got, name), getattr(ref, name), atol=TOL, rtol=TOL, equal_nan=True
        )
    for name in ("preplan", "anchor", "dominated", "intro"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    for strategy in STRATEGIES:
        assert torch.equal(gammas(got, strategy, config), gammas(ref, strategy, config)), strategy


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return asc.load("tiny-llama")


def test_policy_pass_matches_eager_per_sequence(tiny):
    """A padded batch of three samples: log-probs equal single-sequence forwards, credit equals
    the credit from eager attentions of each sequence alone."""
    g = torch.Generator().manual_seed(0)
    vocab = tiny.model.config.vocab_size

    def ids(n):
        return torch.randint(5, vocab, (n,), generator=g)

    prompts, completions = [ids(7), ids(12), ids(4)], [ids(30), ids(17), ids(25)]
    rollout = pack(prompts, completions, tiny.tokenizer.pad_token_id)
    config = CreditConfig()
    with torch.no_grad():
        out = policy_pass(tiny.model, rollout, "coupled", config)
    mask = rollout.response_mask
    assert out.credit_seconds > 0 and out.gamma[~mask].eq(1).all()
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        seq = torch.cat([p, c])
        with torch.no_grad():
            logits = tiny.model(input_ids=seq[None]).logits[0, p.numel() - 1 : -1]
        expected = logits.log_softmax(-1).gather(-1, c[:, None])[:, 0]
        torch.testing.assert_close(out.logp[b, mask[b]], expected, atol=1e-5, rtol=1e-5)
        ref = reference_rhythm(tiny.model, seq, p.numel(), config)
        assert_same_credit(out.rhythms[b], ref, config)
        assert torch.equal(out.gamma[b, mask[b]], gammas(ref, "coupled", config))
        assert ref.anchor.any() and ref.preplan.any()  # the comparison is not vacuous


def test_plain_pass_has_unit_gamma(tiny):
    t = torch.tensor
    rollout = pack([t([5, 6, 7])], [t([8, 9])], tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        plain = policy_pass(tiny.model, rollout, None)
        credit = policy_pass(tiny.model, rollout, "coupled")
    assert plain.gamma.eq(1).all() and plain.rhythms == [] and plain.credit_seconds == 0
    torch.testing.assert_close(plain.logp, credit.logp, atol=1e-6, rtol=1e-6)


# -- trainer ------------------------------------------------------------------------------------
def test_trainer_step(tiny):
    model = tiny.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    def score(completion: str) -> float:
        return completion.count("e") / max(1, len(completion))

    def reward(prompts, completions):
        seen.extend(zip(prompts, completions, strict=True))
        return [score(c) for c in completions]

    cfg = GRPOConfig(group_size=4, max_new_tokens=24, lr=1e-3, iterations=2)
    trainer = GRPOTrainer(model, tiny.tokenizer, reward, cfg)
    log = trainer.step(["one two three", "the quick brown fox"])
    assert [p for p, _ in seen] == ["one two three"] * 4 + ["the quick brown fox"] * 4
    assert log.reward == pytest.approx(sum(score(c) for _, c in seen) / 8)
    assert 0 < log.boosted < 1 and 0 < log.credit_overhead_pct < 100
    assert len(log.sample.tokens) == len(log.sample.gamma) > 10
    assert any(g > 1 for g in log.sample.gamma)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not model.training and trainer.history == [log]


def test_plain_trainer_logs_no_credit(tiny):
    cfg = GRPOConfig(group_size=2, max_new_tokens=8, lr=0.0, strategy=None)
    trainer = GRPOTrainer(tiny.model, tiny.tokenizer, lambda p, c: [len(x) for x in c], cfg)
    log = trainer.step(["one two three"])
    assert log.boosted == 0 and log.credit_overhead_pct == 0 and set(log.sample.gamma) == {1.0}


# -- TRL adapter --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trl_trainer(tiny, tmp_path_factory):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig

    from attnscope.rl.trl import CreditGRPOTrainer

    args = TRLConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=24,
        max_steps=1,
        logging_steps=1,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
    )
    return CreditGRPOTrainer(
        model=tiny.model,
        reward_funcs=lambda prompts, completions, **_: [c.count("e") / 24 for c in completions],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["one two three", "the quick brown fox"] * 2}),
        processing_class=tiny.tokenizer,
    )


def test_trl_gammas_in_trl_layout(trl_trainer, tiny):
    """TRL pads prompts left and completions right; the multipliers equal those of each
    prompt + completion captured alone."""
    t = torch.tensor
    pad = tiny.tokenizer.pad_token_id
    g = torch.Generator().manual_seed(1)
    completions = [torch.randint(5, 400, (n,), generator=g) for n in (22, 14)]
    prompts = [t([11, 12, 13, 14, 15]), t([21, 22])]
    output = {
        "prompt_ids": t([[11, 12, 13, 14, 15], [pad, pad, pad, 21, 22]]),
        "prompt_mask": t([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]),
        "completion_ids": torch.stack([completions[0], torch.cat([completions[1], t([pad] * 8)])]),
        "completion_mask": t([[1] * 22, [1] * 14 + [0] * 8]),
    }
    gamma = trl_trainer.credit_gammas(output)
    assert gamma.shape == (2, 22) and gamma[1, 14:].eq(1).all()
    config = trl_trainer.credit_config
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        seq = torch.cat([p, c])
        with (
            torch.no_grad(),
            asc.capture(tiny.model, config=CREDIT_STATS, fai_rows=(p.numel(), seq.numel())) as cap,
        ):
            tiny.model(input_ids=seq[None])
        trace = cap.trace
        trace.spans = {"prompt": (0, p.numel()), "response": (p.numel(), seq.numel())}
        assert torch.equal(gamma[b, : c.numel()], gammas(rhythm(trace, config), "coupled", config))
    assert gamma[0].gt(1).any()


def test_trl_step(trl_trainer):
    inputs = [{"prompt": "one two three"}] * 4
    output = trl_trainer._generate_and_score_completions(inputs)
    gamma = trl_trainer.credit_gammas(output)  # same weights, same completions: same multipliers
    shaped, mask = output["advantages"], output["completion_mask"].bool()
    assert shaped.shape == output["completion_ids"].shape
    per_row = shaped / gamma  # [B, C]: the sequence advantage, constant along each completion
    torch.testing.assert_close(per_row, per_row[:, :1].expand_as(per_row))
    assert (gamma[mask] > 1).any()

    params = list(trl_trainer.model.parameters())
    before = [p.detach().clone() for p in params]
    trl_trainer.train()
    logs = trl_trainer.state.log_history[0]
    assert 0 < logs["credit/boosted"] < 1 and logs["credit/seconds"] > 0
    assert torch.isfinite(torch.tensor(logs["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))


# -- demo -----------------------------------------------------------------------------------------
def test_rl_demo_two_steps(tmp_path, capsys):
    assert main(["rl-demo", "--steps", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "rl_demo_log.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["step"]) for r in rows] == [
        ("coupled", 0),
        ("coupled", 1),
        ("plain", 0),
        ("plain", 1),
    ]
    assert all(0 <= r["reward"] <= 1 for r in rows)
    assert rows[0]["boosted"] > 0 and rows[2]["boosted"] == 0
    assert (tmp_path / "rl_demo.html").stat().st_size > 100_000
    assert "boosted tokens of a sample" in printed and str(tmp_path / "rl_demo.html") in printed


# -- Gemma-3-270M ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_gemma_credit_from_capture_equals_eager():
    """Credit from a real Gemma generation, captured (during generate() and in the trainer's
    forward over prompt + response), equals credit from eager attentions of a second pass."""
    lm = asc.load("gemma3-270m")
    config = CreditConfig()
    trace = asc.analyze(
        lm,
        "Question: 17 + 25 = ? Think step by step.\nAnswer:",
        generate=40,
        config=CREDIT_STATS,
        fai_rows="response",
        progress=False,
    )
    n_prompt, n = trace.spans["response"]
    assert n - n_prompt >= 30
    ids = torch.tensor(trace.token_ids)
    ref = reference_rhythm(lm.model, ids, n_prompt, config)
    assert ref.anchor.any() and ref.dominated.any()  # the comparison is not vacuous

    assert_same_credit(rhythm(trace, config), ref, config)

    rollout = pack([ids[:n_prompt]], [ids[n_prompt:]], lm.tokenizer.pad_token_id)
    with torch.no_grad():
        out = policy_pass(lm.model, rollout, "coupled", config)
    assert_same_credit(out.rhythms[0], ref, config)
