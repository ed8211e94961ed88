"""Queries read only the runs' statistics, stay bounded in time, memory and rows, and survive
broken runs; the dashboard opens on a readable run and shows no server paths."""

import json
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from attnscope.cli import main
from attnscope.dashboard import create_app, data
from attnscope.errors import AttnscopeError
from attnscope.store import RunStore, StoreWarning
from attnscope.trace import FORMAT_VERSION, QK_FILE, Trace

L, H, T = 2, 2, 5  # layers, heads, tokens of every test run
CROSS_JOIN = "SELECT count(*) FROM range(100000000) a, range(100000000) b WHERE a.range < b.range"


def save_run(path: Path, seed: int = 0, n: int = T, qk: bool = False) -> Trace:
    """A small run (q/k of layer 1 kept with ``qk``) saved at ``path``."""
    g = torch.Generator().manual_seed(seed)
    shape = (L, H, n)
    kept = {1: (torch.randn(H, n, 4, generator=g), torch.randn(H, n, 4, generator=g))} if qk else {}
    trace = Trace(
        tokens=[f"t{i}" for i in range(n)],
        token_ids=list(range(n)),
        spans={"prompt": (0, n)},
        layers=list(range(L)),
        n_heads=H,
        rows={"entropy": torch.rand(shape, generator=g)},
        cols={m: torch.rand(shape, generator=g) for m in ("received", "fai", "sink_score")},
        meta={"model": "unit", "qk_attention": {"1": {"scale": 0.5, "causal": True}} if qk else {}},
        qk=kept,
    )
    trace.save(path)
    return trace


def rewrite_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


# -- 1. queries read the runs' stats files and nothing else ---------------------------------------
@pytest.fixture
def hostile(tmp_path, monkeypatch) -> Path:
    """A runs root ``cwd/runs`` with run ``a`` and a link ``link`` to a directory outside; the
    working directory holds ``.tmp/secret.txt`` (DuckDB's default temporary directory), and
    ``link/../a/stats.parquet`` is a Parquet file outside the root."""
    cwd = tmp_path / "cwd"
    (cwd / ".tmp").mkdir(parents=True)
    (cwd / ".tmp" / "secret.txt").write_text("secret")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.csv").write_text("word,n\nsecret,1\n")
    (tmp_path / "a").mkdir()
    pq.write_table(pa.table({"word": ["secret"]}), tmp_path / "a" / "stats.parquet")
    root = cwd / "runs"
    save_run(root / "a")
    os.symlink(tmp_path / "outside", root / "link")
    monkeypatch.chdir(cwd)
    return root


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT content FROM read_text('.tmp/secret.txt')",
        "SELECT * FROM glob('.tmp/*')",
        "SELECT content FROM read_text('{root}/../.tmp/secret.txt')",
        "SELECT content FROM read_text('{root}/a/../../.tmp/secret.txt')",
        "SELECT * FROM read_csv('{root}/link/secret.csv')",
        "SELECT * FROM read_parquet('{root}/link/../a/stats.parquet')",
        "SELECT content FROM read_text('{root}/a/trace.json')",  # in the root, not a stats file
        "SELECT * FROM glob('{root}/*')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_parquet('https://example.com/x.parquet')",
        "SELECT * FROM query('SELECT content FROM read_text(''.tmp/secret.txt'')')",
    ],
)
def test_query_reads_no_file_but_the_stats(hostile, capsys, sql):
    sql = sql.format(root=hostile)
    with pytest.raises(AttnscopeError, match="queries read only the tables stats and runs"):
        RunStore(hostile).sql(sql)
    assert main(["query", str(hostile), sql]) == 2
    out, err = capsys.readouterr()
    assert "secret" not in out and "Permission Error" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "sql",
    [
        "COPY stats TO 'leak.csv'",
        "COPY (SELECT 1) TO '{root}/leak.parquet'",
        "ATTACH 'leak.db'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "SET temp_directory = '.tmp'",
        "RESET allowed_paths",
        "CREATE TABLE leak AS SELECT 1",
        "SELECT 1; SELECT content FROM read_text('.tmp/secret.txt')",
    ],
)
def test_query_writes_and_configures_nothing(hostile, sql):
    with pytest.raises(AttnscopeError, match="single SELECT"):
        RunStore(hostile).sql(sql.format(root=hostile))
    assert sorted(os.listdir()) == [".tmp", "runs"] and sorted(os.listdir(hostile)) == ["a", "link"]


def test_query_settings_allow_no_file(hostile):
    row = (
        RunStore(hostile)
        .sql(
            "SELECT current_setting('allowed_directories') AS dirs, "
            "current_setting('allowed_paths') AS paths, current_setting('temp_directory') AS tmp, "
            "current_setting('enable_external_access') AS external, "
            "current_setting('lock_configuration') AS locked"
        )
        .to_pylist()[0]
    )
    assert row == {
        "dirs": [],  # was [<cwd>/.tmp/, <root>/]: the stats are read through Arrow
        "paths": [],
        "tmp": "",
        "external": False,
        "locked": True,
    }
    assert not (hostile / ".tmp").exists()


# -- 2. time, memory and rows are bounded ----------------------------------------------------------
def test_cross_join_is_stopped_at_the_timeout(tmp_path, capsys):
    save_run(tmp_path / "a")
    with pytest.raises(AttnscopeError, match=r"ran past its 1 s limit.*--timeout SECONDS"):
        RunStore(tmp_path, timeout=1).sql(CROSS_JOIN)
    assert main(["query", str(tmp_path), CROSS_JOIN, "--timeout", "0.5"]) == 2
    assert "ran past its 0.5 s limit" in capsys.readouterr().err


def test_huge_result_is_cut_to_max_rows(tmp_path, capsys):
    save_run(tmp_path / "a")
    huge = "SELECT * FROM range(20000000) t(i)"  # 6 GB of RSS when returned whole
    store = RunStore(tmp_path, max_rows=1000)
    with pytest.warns(StoreWarning, match="more than 1000 rows: returning the first 1000"):
        table = store.sql(huge)
    assert table.column("i").to_pylist() == list(range(1000)) and store.truncated
    assert store.sql("SELECT * FROM range(1000) t(i)").num_rows == 1000 and not store.truncated
    assert main(["query", str(tmp_path), huge, "--max-rows", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == ["i", "0", "1", "2"]
    assert "showing the first 3 rows" in err and "--max-rows N" in err
    assert main(["query", str(tmp_path), "SELECT * FROM range(2000) t(i)"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 + 1000 and "first 1000 rows" in err  # the CLI default


def test_memory_limit_and_threads_are_set(tmp_path, capsys):
    save_run(tmp_path / "a")
    setting = "SELECT current_setting('memory_limit') AS m, current_setting('threads') AS t"
    assert RunStore(tmp_path).sql(setting).to_pylist() == [
        {"m": "1.8 GiB", "t": min(4, os.cpu_count())}  # defaults: 2GB, at most 4 threads
    ]
    store = RunStore(tmp_path, memory_limit="300MB", threads=1)
    assert store.sql(setting).to_pylist() == [{"m": "286.1 MiB", "t": 1}]
    assert main(["query", str(tmp_path), setting, "--memory-limit", "300MB"]) == 0
    assert "286.1 MiB" in capsys.readouterr().out
    with pytest.raises(AttnscopeError, match=r"more than its memory limit 64MB.*--memory-limit"):
        RunStore(tmp_path, memory_limit="64MB").sql("SELECT list(i) FROM range(50000000) t(i)")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--memory-limit", "lots"], "memory limit 'lots' is not a size such as 2GB"),
        (["--max-rows", "0"], "max_rows must be >= 1"),
        (["--timeout", "-1"], "timeout must be a positive number of seconds"),
    ],
)
def test_bad_bounds_are_refused(tmp_path, capsys, flags, message):
    save_run(tmp_path / "a")
    assert main(["query", str(tmp_path), "SELECT 1", *flags]) == 2
    assert message in capsys.readouterr().err


# -- 3. a broken run is skipped, named, and the others stay queryable -----------------------------
def _break(root: Path, how: str) -> None:
    """Leave run ``b`` under ``root`` broken in way ``how``."""
    b = root / "b"
    if how == "link out of the root":
        save_run(root.parent / "elsewhere")
        os.symlink(root.parent / "elsewhere", b)
        return
    if how == "newer corpus":
        save_run(b / "prompts" / "p")
        (b / "corpus.json").write_text(
            json.dumps({"format": "attnscope-corpus", "format_version": 2, "prompts": ["p"]})
        )
        return
    save_run(b)
    stats = b / "stats.parquet"
    if how == "corrupt stats":
        stats.write_bytes(b"PAR1 not parquet")
    elif how == "empty stats":
        stats.write_bytes(b"")
    elif how == "missing stats":
        stats.unlink()
    elif how == "stats of another shape":
        save_run(root.parent / "longer", n=2 * T)
        shutil.copy(root.parent / "longer" / "stats.parquet", stats)
    elif how == "stats link out of the root":
        save_run(root.parent / "elsewhere")
        stats.unlink()
        os.symlink(root.parent / "elsewhere" / "stats.parquet", stats)
    elif how == "newer run":
        rewrite_json(b / "trace.json", format_version=FORMAT_VERSION + 98)
    elif how == "stats column of another type":
        table = pq.read_table(stats)
        text = pa.array(["x"] * table.num_rows)
        pq.write_table(table.set_column(table.schema.get_field_index("fai"), "fai", text), stats)
    elif how == "stats with a run column":
        table = pq.read_table(stats)
        pq.write_table(table.append_column("run", pa.array(["a"] * table.num_rows)), stats)


BROKEN = {
    "corrupt stats": "stats.parquet is damaged (ArrowInvalid",
    "empty stats": "stats.parquet is empty",
    "missing stats": "stats.parquet is missing",
    "stats of another shape": f"stats.parquet holds {L * H * 2 * T} rows, not the {L * H * T}",
    "stats link out of the root": "stats.parquet links out of the runs root",
    "link out of the root": "it links out of the runs root",
    "newer run": (
        f"written by a newer attnscope (format {FORMAT_VERSION + 98} > {FORMAT_VERSION}): "
        "upgrade attnscope"
    ),
    "newer corpus": "written by a newer attnscope (corpus format 2 > 1): upgrade attnscope",
    "stats column of another type": "stats.parquet has column types other runs do not",
    "stats with a run column": "stats.parquet has columns ['run'], which the store adds",
}


@pytest.mark.parametrize("how", list(BROKEN))
def test_broken_run_is_skipped_and_named(tmp_path, capsys, how):
    root = tmp_path / "root"
    save_run(root / "a")
    _break(root, how)
    why = BROKEN[how]
    store = RunStore(root)
    with pytest.warns(StoreWarning, match=rf"skipping (corpus )?run 'b': {re.escape(why)}"):
        counts = store.sql("SELECT run, count(*) AS n FROM stats GROUP BY run").to_pylist()
    assert counts == [{"run": "a", "n": L * H * T}]
    assert list(store.skipped) == ["b"] and store.skipped["b"].startswith(why)
    with pytest.warns(StoreWarning):
        assert store.sql("SELECT run FROM runs").column("run").to_pylist() == ["a"]
    assert str(tmp_path) not in store.skipped["b"]
    assert main(["query", str(root), "SELECT run, n_tokens FROM runs"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == ["run", "n_tokens", "a", str(T)]
    assert f"attnscope: warning: skipped run 'b': {why}" in err and "Traceback" not in err


def test_broken_corpus_prompts_are_skipped_one_by_one(tmp_path):
    root = tmp_path / "root"
    for pid in ("p0", "p1"):
        save_run(root / "c" / "prompts" / pid)
    save_run(tmp_path / "outside")
    os.symlink(tmp_path / "outside", root / "c" / "prompts" / "evil")
    (root / "c" / "corpus.json").write_text(
        json.dumps(
            {"format": "attnscope-corpus", "format_version": 1, "prompts": ["p0", "p1", "evil"]}
        )
    )
    (root / "c" / "prompts" / "p1" / "stats.parquet").write_bytes(b"")
    store = RunStore(root)
    with pytest.warns(StoreWarning):
        table = store.sql("SELECT run, prompt, count(*) AS n FROM stats GROUP BY ALL")
    assert table.to_pylist() == [{"run": "c", "prompt": "p0", "n": L * H * T}]
    assert store.skipped == {
        "c/p1": "stats.parquet is empty",
        "c/evil": "it links out of the runs root",
    }


def test_only_broken_runs_is_a_clear_error(tmp_path, capsys):
    save_run(tmp_path / "b")
    (tmp_path / "b" / "stats.parquet").write_bytes(b"")
    assert main(["query", str(tmp_path), "SELECT * FROM runs"]) == 2
    err = capsys.readouterr().err
    assert "skipped run 'b': stats.parquet is empty" in err
    assert "no runs under" in err and "that can be read (1 skipped)" in err


# -- 4. the dashboard -----------------------------------------------------------------------------
def _strings(node) -> list[str]:
    """Every string in a JSON value (Dash escapes '/' in its responses)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _component(node, component_id: str) -> dict:
    """The props of the component ``component_id`` in a Dash layout (JSON)."""
    if isinstance(node, dict):
        if node.get("props", {}).get("id") == component_id:
            return node["props"]
        children = list(node.values())
    elif isinstance(node, list):
        children = node
    else:
        return {}
    for child in children:
        found = _component(child, component_id)
        if found:
            return found
    return {}


def _update(app, outputs: list[str], inputs: dict, state: dict | None = None) -> list[str]:
    """The strings of the page update of the callback with ``outputs`` ("id.prop") for
    ``inputs`` ({"id.prop": value}), as the browser would ask for it."""
    key = ".." + "...".join(outputs) + ".."

    def props(values: dict) -> list[dict]:
        return [
            {"id": k.split(".")[0], "property": k.split(".")[1], "value": v}
            for k, v in values.items()
        ]

    response = app.server.test_client().post(
        "/_dash-update-component",
        json={
            "output": key,
            "outputs": [{"id": o.split(".")[0], "property": o.split(".")[1]} for o in outputs],
            "inputs": props(inputs),
            "state": props(state or {}),
            "changedPropIds": [next(iter(inputs))],
        },
    )
    assert response.status_code == 200
    return _strings(response.get_json())


def test_dashboard_opens_on_the_first_readable_run(tmp_path):
    data.clear_caches()
    root = tmp_path / "root"
    save_run(root / "a_corrupt")
    (root / "a_corrupt" / "stats.parquet").write_bytes(b"PAR1 not parquet")
    save_run(root / "b_newer")
    rewrite_json(root / "b_newer" / "trace.json", format_version=FORMAT_VERSION + 1)
    save_run(root / "c_unloadable")  # listed (its header has the summary) but fails to load
    header = json.loads((root / "c_unloadable" / "trace.json").read_text())
    del header["meta"]
    (root / "c_unloadable" / "trace.json").write_text(json.dumps(header))
    save_run(root / "d_ok")
    save_run(root / "e_ok", seed=1)
    with pytest.warns(StoreWarning):
        layout = create_app(root).server.test_client().get("/_dash-layout").get_json()
    run = _component(layout, "run")
    assert run["value"] == "d_ok"
    assert [o["value"] for o in run["options"]] == ["c_unloadable", "d_ok", "e_ok"]
    skipped = " ".join(_strings(_component(layout, "skipped")))
    assert "skipped run 'a_corrupt': stats.parquet is damaged" in skipped
    newer = f"(format {FORMAT_VERSION + 1} > {FORMAT_VERSION})"
    assert f"skipped run 'b_newer': written by a newer attnscope {newer}" in skipped
    assert "upgrade attnscope" in skipped
    assert not any(str(tmp_path) in s for s in _strings(layout))


@pytest.mark.filterwarnings("ignore::attnscope.store.StoreWarning")  # run 'newer' is skipped
def test_dashboard_errors_name_paths_relative_to_the_root(tmp_path):
    data.clear_caches()
    root = tmp_path / "root"
    save_run(root / "a", qk=True)
    (root / "a" / QK_FILE).unlink()
    save_run(root / "newer")
    rewrite_json(root / "newer" / "trace.json", format_version=FORMAT_VERSION + 1)
    save_run(tmp_path / "outside")
    app = create_app(root)
    run_outputs = [
        "run-info.children",
        "loaded.data",
        "metric.options",
        "metric.value",
        "layer.options",
        "layer.value",
    ]
    state = {"metric.value": None, "layer.value": None}
    shown = _update(app, run_outputs, {"run.value": "../outside"}, state)
    assert "no run named '../outside' under the runs root" in shown
    shown = _update(app, run_outputs, {"run.value": "newer"}, state)
    assert any(s.startswith("newer was written by a newer attnscope") for s in shown)
    shown += _update(
        app,
        ["heatmap.figure", "heatmap-msg.children", "heatmap.style"],  # graphs hide when empty
        {
            "loaded.data": "a",
            "head.data": {"layer": 1, "head": 0},
            "hm-start.value": 0,
            "hm-size.value": 5,
            "hm-options.value": [],
            "token.data": None,
        },
    )
    assert f"cannot read kept queries/keys from a/{QK_FILE}: No such file or directory: " in (
        " ".join(shown)
    )
    assert not any(str(tmp_path) in s for s in shown)
    store = RunStore(root)
    text = f"{root}/a/x, {root}, {root}2/y and '/etc/passwd'"
    assert data.page_text(store, text) == (
        "a/x, the runs root, <a path outside the runs root> and '<a path outside the runs root>'"
    )
