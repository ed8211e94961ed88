"""Head metrics (previous-token, duplicate-token, induction, copy, lookback) from single weights
exp(score - lse), after every backend, against the independent reference (tests/head_reference.py)."""

import numpy as np
import pytest
import scipy.stats
import torch
from head_reference import head_rows, lookback_rows, probabilities, tl_scores

import attnscope as asc
from attnscope.errors import AttnscopeError, ShapeError, UnsupportedMetricError
from attnscope.kernels import BACKENDS, attention_stats, lookups
from attnscope.kernels.table import HEAD_METRICS

HEADS = ("prev_token", "duplicate_token", "induction", "copy_attention")


def _inputs(seed=0, b=2, hq=4, hkv=2, t=24, d=8, vocab=4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64) * 1.5
    return q, k, torch.randint(0, vocab, (b, t), generator=g)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize(
    "options",
    [{}, {"softcap": 3.0, "sliding_window": 7}, {"sinks": "random"}],
    ids=["causal", "softcap-sliding", "sinks"],
)
def test_head_metrics_match_reference(backend, options):
    q, k, tokens = _inputs()
    options = dict(options)
    if options.get("sinks") == "random":
        options["sinks"] = torch.randn(q.shape[1], dtype=torch.float64)
    if backend == "triton":  # fp32 kernels
        q, k = q.float(), k.float()
        options = {n: v.float() if torch.is_tensor(v) else v for n, v in options.items()}
    source = (3, 15)
    stats = attention_stats(
        q,
        k,
        metrics=(*HEADS, "lookback", "entropy"),
        spans={"source": source, "context": (0, 10)},
        tokens=tokens,
        backend=backend,
        **options,
    )
    assert list(stats.rows) == [*HEADS, "lookback", "entropy"]  # span mass for lookback dropped
    a = probabilities(q, k, **options)
    ref = head_rows(a, tokens, source)
    tol = 1e-5 if backend == "triton" else 1e-10
    for name in HEADS:
        torch.testing.assert_close(
            stats.rows[name].double(), ref[name], atol=tol, rtol=tol, equal_nan=True
        )
    torch.testing.assert_close(
        stats.rows["lookback"].double(), lookback_rows(a, 10), atol=tol, rtol=tol, equal_nan=True
    )


@pytest.mark.parametrize("window", [None, 7])
def test_lookups_in_row_chunks_match_reference(monkeypatch, window):
    """Rows looked up a few at a time (a 32K text takes 1024 per chunk), copies enumerated only
    inside the sliding window: the same values as the reference."""
    monkeypatch.setattr(lookups, "LOOKUP_ROWS", 5)
    q, k, tokens = _inputs(seed=3, vocab=3)
    source = (2, 20)
    stats = attention_stats(
        q, k, metrics=HEADS, spans={"source": source}, tokens=tokens, sliding_window=window
    )
    ref = head_rows(probabilities(q, k, sliding_window=window), tokens, source)
    for name in HEADS:
        torch.testing.assert_close(
            stats.rows[name], ref[name], atol=1e-10, rtol=1e-10, equal_nan=True
        )


def test_decode_rows_and_padding_positions():
    """A decode-like call (the last 5 queries) and left padding: positions, not indices."""
    q, k, tokens = _inputs(seed=1, b=1)
    full = attention_stats(q, k, metrics=HEADS, tokens=tokens)
    tail = attention_stats(q[:, :, -5:], k, metrics=HEADS, tokens=tokens)
    for name in HEADS:
        torch.testing.assert_close(tail.rows[name], full.rows[name][..., -5:], equal_nan=True)
    pad = 3  # three padding keys in front: positions start after them
    kp = torch.cat([torch.zeros(1, 2, pad, 8, dtype=k.dtype), k], 2)
    qp = torch.cat([torch.zeros(1, 4, pad, 8, dtype=q.dtype), q], 2)
    valid = torch.ones(1, kp.shape[2], dtype=torch.bool)
    valid[:, :pad] = False
    padded = attention_stats(qp, kp, metrics=HEADS, tokens=tokens, mask=valid)
    for name in HEADS:
        torch.testing.assert_close(padded.rows[name][..., pad:], full.rows[name], equal_nan=True)


def test_head_metrics_are_opt_in_and_checked():
    q, k, tokens = _inputs(b=1)
    assert not set(HEAD_METRICS) & set(attention_stats(q, k).rows)
    with pytest.raises(ShapeError, match="token ids"):
        attention_stats(q, k, metrics=("induction",))
    with pytest.raises(ShapeError, match=r"\[B, N\]"):
        attention_stats(q, k, metrics=("induction",), tokens=tokens[0])
    with pytest.raises(UnsupportedMetricError, match="context"):
        attention_stats(q, k, metrics=("lookback",))
    prev = attention_stats(q, k, metrics=("prev_token",))  # positions only: no tokens needed
    assert prev.rows["prev_token"][..., 0].eq(0).all()


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return asc.load("tiny-llama")


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_capture_batch_and_generate_match_eager(tiny, eager):
    """Left-padded batch and a generation (decode steps): the ids the capture records."""
    from reference import eager_attentions

    model = tiny.model
    if eager:
        model.set_attn_implementation("eager")
    try:
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(5, 12, (2, 20), generator=g)  # few distinct tokens: many copies
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        with torch.no_grad(), asc.capture(model, metrics=HEADS) as cap:
            model(input_ids=ids, attention_mask=mask)
        for b, trace in enumerate(cap.traces()):
            keep = mask[b].bool()
            attn = torch.stack(eager_attentions(model, input_ids=ids[b : b + 1, keep]))[:, 0]
            ref = head_rows(attn, ids[b : b + 1, keep].expand(attn.shape[0], -1))
            for name in HEADS:
                torch.testing.assert_close(
                    trace.rows[name].double(), ref[name], atol=1e-5, rtol=1e-4, equal_nan=True
                )
        with torch.no_grad(), asc.capture(model, metrics=HEADS) as cap:
            model.generate(input_ids=ids[:1, :8], max_new_tokens=6, do_sample=False)
        trace = cap.trace
        full = torch.tensor([trace.token_ids])
        attn = torch.stack(eager_attentions(model, input_ids=full))[:, 0]
        ref = head_rows(attn, full.expand(attn.shape[0], -1))
        for name in ("prev_token", "duplicate_token", "induction"):
            torch.testing.assert_close(trace.rows[name].double(), ref[name], atol=1e-5, rtol=1e-4)
        # the copy lookup needs the next token: known for the prompt rows, not for decode steps
        torch.testing.assert_close(
            trace.rows["copy_attention"][..., :7].double(),
            ref["copy_attention"][..., :7],
            atol=1e-5,
            rtol=1e-4,
            equal_nan=True,
        )
    finally:
        model.set_attn_implementation("sdpa")


def test_head_table_scores_match_transformer_lens_definition(tiny):
    from reference import eager_attentions

    ids = torch.randint(5, 14, (1, 30), generator=torch.Generator().manual_seed(3))
    with (
        torch.no_grad(),
        asc.capture(tiny.model, metrics=(*HEADS[:3], "fai", "sink_score", "mean_distance")) as cap,
    ):
        tiny.model(input_ids=ids)
    table = cap.trace.heads().to_pylist()
    attn = torch.stack(eager_attentions(tiny.model, input_ids=ids))[:, 0]
    assert len(table) == attn.shape[0] * attn.shape[1]
    for row in table:
        ref = tl_scores(attn[row["layer"], row["head"]], ids[0].tolist())
        for name, (mul, abs_) in ref.items():
            assert row[name] == pytest.approx(mul, abs=1e-5)
            assert row[f"{name}_abs"] == pytest.approx(abs_, abs=1e-5)
        assert {"receiver", "sink", "span", "label"} <= set(row)
    # receiver: excess kurtosis over keys 1.. of the FAI column (mean weight from rows 10-100 later)
    t, s = torch.arange(30)[:, None], torch.arange(30)[None, :]
    later = ((t - s) >= 10) & ((t - s) <= 100)  # [T, T]
    fai = (attn * later).sum(-2) / later.sum(0)  # [L, H, T], NaN where no row counts
    expected = scipy.stats.kurtosis(fai[..., 1:].numpy(), axis=-1, nan_policy="omit")
    got = [[row["receiver"] for row in table if row["layer"] == i] for i in range(attn.shape[0])]
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-3, atol=1e-3)
    # receiver labels only within the model's top 10% by receiver score (and >= 10)
    top = max(10.0, float(np.nanquantile(expected, 0.9)))
    labelled = {(r["layer"], r["head"]) for r in table if r["label"] == "receiver"}
    first = {(r["layer"], r["head"]) for r in table if r["label"] in ("-", "sink", "receiver")}
    assert labelled == {(r["layer"], r["head"]) for r in table if r["receiver"] >= top} & first


def test_lookback_features_match_reference(tiny):
    from reference import eager_attentions

    from attnscope.taxonomy.lookback import lookback_features, lookback_ratios

    context, response = "a b c d e f g h", " i j k l"
    ratios = lookback_ratios(tiny, context, response)  # [R, L, H]
    n = len(tiny.tokenizer(context).input_ids)
    ids = tiny.tokenizer(context + response, return_tensors="pt").input_ids
    assert ids.shape[1] == n + ratios.shape[0]
    attn = torch.stack(eager_attentions(tiny.model, input_ids=ids))[:, 0]
    ref = lookback_rows(attn, n)[..., n:].permute(2, 0, 1)
    torch.testing.assert_close(ratios.double(), ref, atol=1e-5, rtol=1e-4)
    features = lookback_features(tiny, [(context, response), (context, " m")])
    assert features.shape == (2, ratios.shape[1] * ratios.shape[2])
    torch.testing.assert_close(features[0], ratios.mean(0).reshape(-1))


def test_heads_api_and_command(tiny, tmp_path, capsys):
    import pyarrow.parquet as pq

    from attnscope.cli import main

    table = asc.heads(tiny, max_tokens=40, n_random=10, retrieval=1, progress=False)
    n_layers = tiny.model.config.num_hidden_layers
    n_heads = tiny.model.config.num_attention_heads
    assert table.num_rows == n_layers * n_heads
    assert table.column_names[:2] == ["layer", "head"] and table.column_names[-1] == "label"
    for name in ("prev_token_abs", "induction_random", "retrieval", "receiver", "sink"):
        assert name in table.column_names
    scores = torch.tensor(table.column("induction_random").to_pylist())
    assert ((scores >= 0) & (scores <= 0.5 + 1e-6)).all()  # no pattern key in the first half
    out = tmp_path / "run"
    assert (
        main(
            [
                "heads",
                "--model",
                "tiny-llama",
                "--max-tokens",
                "40",
                "--random",
                "10",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "labels:" in capsys.readouterr().out
    saved = pq.read_table(out / "heads.parquet")
    assert saved.num_rows == n_layers * n_heads
    trace = asc.Trace.load(out)
    assert "induction" in trace.rows and len(trace) == 40
    assert trace.meta["model"] == "tiny-llama" and trace.meta["text"]  # named in its report
    report = (out / "report.html").read_text()  # heads coloured by the table's scores too
    assert "Heads coloured by induction (random tokens)" in report
    with pytest.raises(AttnscopeError, match="n_random"):
        asc.heads(tiny, n_random=1)
