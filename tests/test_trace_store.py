"""Trace save/load round trip (kept q/k read lazily), head tags, atomic writes, RunStore SQL and its
confinement."""

import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import attnscope as asc
from attnscope import metrics
from attnscope.errors import AttnscopeError, RunExistsError
from attnscope.store import RunStore
from attnscope.trace import QK_FILE, Trace


def make_trace(n_layers=2, n_heads=3, n=7, seed=0) -> Trace:
    g = torch.Generator().manual_seed(seed)
    return Trace(
        tokens=[f"t{i}" for i in range(n)],
        token_ids=list(range(n)),
        spans={"prompt": (0, 4), "response": (4, n)},
        layers=list(range(n_layers)),
        n_heads=n_heads,
        rows={
            "entropy": torch.rand(n_layers, n_heads, n, generator=g),
            "mean_distance": torch.rand(n_layers, n_heads, n, generator=g) * 5,
        },
        cols={
            "fai": torch.rand(n_layers, n_heads, n, generator=g),
            "sink_score": torch.rand(n_layers, n_heads, n, generator=g),
        },
        meta={"model": "unit"},
    )


def test_round_trip(tmp_path):
    trace = make_trace()
    trace.cols["fai"][..., -1] = float("nan")
    trace.save(tmp_path / "run")
    back = Trace.load(tmp_path / "run")
    assert back.tokens == trace.tokens and back.spans == trace.spans and back.meta == trace.meta
    for name in trace.rows:
        assert torch.equal(back.rows[name], trace.rows[name])
    torch.testing.assert_close(back.cols["fai"], trace.cols["fai"], equal_nan=True)


def test_undefined_values_are_sql_nulls(tmp_path):
    trace = make_trace()
    trace.cols["fai"][..., -2:] = float("nan")  # no key in the horizon
    trace.save(tmp_path / "run")
    store = RunStore(tmp_path)
    nulls, mean = store.sql("SELECT count(*) FILTER (fai IS NULL), avg(fai) FROM stats").columns
    assert nulls[0].as_py() == 2 * 2 * 3
    assert mean[0].as_py() == pytest.approx(trace.cols["fai"].nanmean().item(), rel=1e-6)


def test_to_arrow_is_long_and_ordered():
    trace = make_trace()
    table = trace.to_arrow()
    assert table.num_rows == 2 * 3 * 7
    rows = table.to_pylist()
    r = rows[1 * 3 * 7 + 2 * 7 + 5]  # layer 1, head 2, position 5
    assert (r["layer"], r["head"], r["position"], r["token"]) == (1, 2, 5, "t5")
    assert r["entropy"] == pytest.approx(trace.rows["entropy"][1, 2, 5].item())


def test_shape_mismatch_is_refused():
    with pytest.raises(AttnscopeError, match="expected"):
        Trace(
            tokens=["a"],
            token_ids=[0],
            spans={},
            layers=[0],
            n_heads=1,
            rows={"entropy": torch.zeros(1, 1, 2)},
            cols={},
        )


def test_existing_run_is_refused_then_replaced_atomically(tmp_path):
    make_trace(seed=0).save(tmp_path / "run")
    with pytest.raises(RunExistsError, match="overwrite"):
        make_trace(seed=1).save(tmp_path / "run")
    make_trace(seed=1).save(tmp_path / "run", overwrite=True)
    assert torch.equal(
        Trace.load(tmp_path / "run").rows["entropy"], make_trace(seed=1).rows["entropy"]
    )
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no temporary leftovers


def test_failed_save_leaves_old_run_intact(tmp_path, monkeypatch):
    make_trace(seed=0).save(tmp_path / "run")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pyarrow.parquet.write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        make_trace(seed=1).save(tmp_path / "run", overwrite=True)
    assert torch.equal(
        Trace.load(tmp_path / "run").rows["entropy"], make_trace(seed=0).rows["entropy"]
    )
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_newer_format_is_refused(tmp_path):
    make_trace().save(tmp_path / "run")
    header = json.loads((tmp_path / "run" / "trace.json").read_text())
    header["format_version"] = 99
    (tmp_path / "run" / "trace.json").write_text(json.dumps(header))
    with pytest.raises(AttnscopeError, match="newer attnscope"):
        Trace.load(tmp_path / "run")


def test_run_store_sql(tmp_path):
    make_trace(seed=0).save(tmp_path / "a")
    make_trace(seed=1, n_layers=3).save(tmp_path / "b")
    store = RunStore(tmp_path)
    assert [r.name for r in store.runs()] == ["a", "b"]
    table = store.sql(
        "SELECT run, count(*) AS n, avg(entropy) AS e FROM stats GROUP BY run ORDER BY run"
    )
    assert table.column("n").to_pylist() == [2 * 3 * 7, 3 * 3 * 7]
    assert table.column("e")[0].as_py() == pytest.approx(
        make_trace(seed=0).rows["entropy"].mean().item(), rel=1e-6
    )
    joined = store.sql("SELECT r.n_layers FROM runs r WHERE r.run = 'b'")
    assert joined.column("n_layers").to_pylist() == [3]
    assert torch.equal(store.load("a").rows["entropy"], make_trace(seed=0).rows["entropy"])


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        ("SELECT * FROM read_csv('/etc/passwd')", "Permission"),
        ("COPY stats TO 'leak.csv'", "single SELECT"),
        ("SELECT 1; SELECT 2", "single SELECT"),
        ("ATTACH '/tmp/x.db'", "single SELECT"),
        ("SELEC 1", "does not parse"),
    ],
)
def test_run_store_sql_is_confined(tmp_path, sql, match):
    make_trace().save(tmp_path / "a")
    with pytest.raises(AttnscopeError, match=match):
        RunStore(tmp_path).sql(sql)
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_run_names_cannot_escape_the_root(tmp_path):
    make_trace().save(tmp_path / "root" / "a")
    make_trace().save(tmp_path / "outside")
    store = RunStore(tmp_path / "root")
    with pytest.raises(AttnscopeError, match="no run named"):
        store.load("../outside")
    with pytest.raises(AttnscopeError, match="does not exist"):
        RunStore(tmp_path / "missing")


def test_layer_qk_names_the_kept_layers():
    trace = make_trace()
    q, k = torch.randn(3, 7, 4), torch.randn(1, 7, 4)
    trace.qk[1] = (q, k)
    trace.meta["qk_attention"] = {"1": {"scale": 0.5, "causal": True}}
    got_q, got_k, attention = trace.layer_qk(1)
    assert got_q is q and got_k is k and attention == {"scale": 0.5, "causal": True}
    with pytest.raises(AttnscopeError, match=r"no queries/keys for layer 0.*kept: \[1\]"):
        trace.layer_qk(0)


def test_head_tags_are_head_groups_and_sink_heads():
    trace = make_trace(n_layers=4, n_heads=5)
    tags = trace.head_tags()
    assert list(tags) == ["local", "global", "sink"]
    groups = trace.head_groups(metrics.HEAD_GROUP_FRACTION)
    assert torch.equal(tags["local"], groups["local"]) and tags["local"].sum() == 6  # 30% of 20
    assert torch.equal(tags["global"], groups["global"])
    assert torch.equal(tags["sink"], trace.sink_heads(metrics.SINK_EPS))
    assert torch.equal(tags["sink"], trace.cols["sink_score"][..., 0] > metrics.SINK_EPS)
    tags = trace.head_tags(fraction=0.5, eps=0.9)
    assert tags["local"].sum() == 10 and torch.equal(tags["sink"], trace.sink_heads(0.9))


# -- kept queries and keys, saved and read back lazily -------------------------------------------
@pytest.fixture(scope="module")
def qk_run(tmp_path_factory) -> tuple[Trace, Path]:
    """A 3-layer tiny Llama (4 query / 2 KV heads) keeping q/k of layers 0 and 2, and its run."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad(), asc.capture(model, keep_qk=[0, 2]) as cap:
        model(torch.randint(0, 64, (1, 12)))
    path = tmp_path_factory.mktemp("runs") / "qk"
    cap.trace.save(path)
    return cap.trace, path


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Records "open" for each opening of a safetensors file by Trace, and each tensor read."""
    log: list[str] = []

    class Spy:
        def __init__(self, f):
            self.f = f

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            log.append(name)
            return self.f.get_tensor(name)

    @contextmanager
    def spy_open(file, framework):
        log.append("open")
        with safe_open(file, framework=framework) as f:
            yield Spy(f)

    monkeypatch.setattr("attnscope.trace.safe_open", spy_open)
    return log


def test_loaded_run_gives_kept_qk_lazily(qk_run, reads):
    trace, path = qk_run
    assert sorted(trace.qk) == [0, 2] and trace.qk[0][0].shape == (4, 12, 8)
    back = Trace.load(path)
    assert reads == []  # loading reads no q/k
    assert sorted(back.qk) == [0, 2] and 2 in back.qk and 1 not in back.qk and len(back.qk) == 2
    assert reads == ["open"]  # the header only
    q, k, attention = back.layer_qk(2)
    assert reads[1:] == ["open", "q.2", "k.2"]  # one layer, the header is not read again
    want_q, want_k, want_attention = trace.layer_qk(2)
    # stored as float16, read back as float32
    assert q.dtype == k.dtype == torch.float32 and attention == want_attention
    assert torch.equal(q, want_q.half().float()) and torch.equal(k, want_k.half().float())
    assert k.shape == (2, 12, 8)
    q, k, _ = back.layer_qk(0)
    assert torch.equal(q, trace.qk[0][0].half().float())
    assert torch.equal(k, trace.qk[0][1].half().float())
    with pytest.raises(AttnscopeError, match=r"layer 1 \(kept: \[0, 2\]\).*--keep-qk 1"):
        back.layer_qk(1)
    q, k = Trace.load_qk(path, 2)
    assert torch.equal(q, trace.qk[2][0].half().float())
    assert torch.equal(k, trace.qk[2][1].half().float())
    with pytest.raises(AttnscopeError, match=r"layers \[0, 2\], not 1"):
        Trace.load_qk(path, 1)


def test_loaded_run_with_qk_saves_again(qk_run, tmp_path):
    trace, path = qk_run
    back = Trace.load(path)
    back.save(tmp_path / "again")
    again = Trace.load(tmp_path / "again")
    assert again.tokens == trace.tokens and again.meta == back.meta  # JSON: tuples become lists
    for table in ("rows", "cols"):
        for name, values in getattr(trace, table).items():
            torch.testing.assert_close(getattr(again, table)[name], values, equal_nan=True)
    assert sorted(again.qk) == [0, 2]
    for layer, (q, k) in trace.qk.items():  # float16 on disk, saved again unchanged
        want = (q.half().float(), k.half().float())
        assert all(torch.equal(a, b) for a, b in zip(again.qk[layer], want, strict=True))
    make_trace().save(tmp_path / "plain")
    assert Trace.load(tmp_path / "plain").qk == {}  # nothing kept, no file expected


@pytest.mark.parametrize("damage", ["missing", "truncated", "foreign"])
def test_missing_or_damaged_qk_file_is_named(qk_run, tmp_path, damage):
    _, path = qk_run
    shutil.copytree(path, tmp_path / "run")
    file = tmp_path / "run" / QK_FILE
    if damage == "missing":
        file.unlink()
    elif damage == "truncated":
        file.write_bytes(file.read_bytes()[:200])
    else:
        save_file({"q.0": torch.zeros(1)}, file)  # no keys
    back = Trace.load(tmp_path / "run")  # the file is read only when q/k are asked for
    with pytest.raises(AttnscopeError, match=re.escape(str(file))) as err:
        back.layer_qk(0)
    assert ("is damaged" if damage == "foreign" else "cannot read kept queries/keys") in str(
        err.value
    )


def test_stats_and_runs_carry_model_and_attention_kind(tmp_path, qk_run):
    """SQL can keep causal, bidirectional and cross-attention statistics apart."""
    from transformers import BertConfig, BertModel

    causal, _ = qk_run
    replace(causal, meta={**causal.meta, "kind": "causal-lm"}).save(tmp_path / "llama")
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64,
    )  # fmt: skip
    bert = BertModel(config).eval()
    with torch.no_grad(), asc.capture(bert) as cap:
        bert(torch.randint(0, 64, (1, 9)))
    encoder = cap.trace
    replace(encoder, meta={**encoder.meta, "kind": "encoder"}).save(tmp_path / "bert")
    make_trace().save(tmp_path / "old")  # written without kinds
    store = RunStore(tmp_path)
    kinds = store.sql(
        "SELECT run, model_kind, attention, count(*) AS n FROM stats GROUP BY ALL ORDER BY run"
    ).to_pylist()
    assert kinds == [
        {"run": "bert", "model_kind": "encoder", "attention": "bidirectional", "n": 2 * 4 * 9},
        {"run": "llama", "model_kind": "causal-lm", "attention": "causal", "n": 3 * 4 * 12},
        {"run": "old", "model_kind": "?", "attention": "?", "n": 2 * 3 * 7},
    ]
    runs = store.sql("SELECT run, model_kind, attention FROM runs ORDER BY run").to_pylist()
    assert [(r["model_kind"], r["attention"]) for r in runs] == [
        ("encoder", "bidirectional"),
        ("causal-lm", "causal"),
        ("?", "?"),
    ]
