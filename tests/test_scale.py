"""Corpus runs on Ray Data (attnscope.scale) and models spread over devices with device_map.

Ray runs on a real local instance shared by the module (2 CPUs, small object store, its own temp
directory) and on a simulated two-node cluster (ray.cluster_utils.Cluster) driven by the command
line in a subprocess. Every run is compared with the local engine on the same 40 prompts.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import attnscope as asc
from attnscope.cli import main
from attnscope.errors import AttnscopeError
from attnscope.mirror import STAGING_ENV
from attnscope.store import RunStore

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from attnscope.scale import RayEngine  # noqa: E402
from attnscope.scale.rows import SCHEMA, from_row, to_row  # noqa: E402
from attnscope.scale.worker import KILL_WORKER  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the quick brown fox jumps over a lazy dog while seven green bottles stand on the wall"
PROMPTS = [(f"p{i:02d}", " ".join(WORDS.split()[: 2 + i % 13]) + f" {i}") for i in range(40)]
GENERATE, BATCH = 4, 4
OBJECT_STORE = 100 * 2**20  # bytes per node: Ray's minimum is 75 MB
PROMPT_FILES = {"trace.json", "stats.parquet"}


@pytest.fixture(scope="module")
def ray_env(cache_dir):
    """Ray's files under a short temporary directory (socket paths are limited to 107 bytes), no
    memory monitor killing workers on a machine shared with other tests; the model cache
    (ATTNSCOPE_CACHE) is set before any Ray process starts, so every worker inherits it."""
    mp = pytest.MonkeyPatch()
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as tmp:
        mp.setenv("RAY_TMPDIR", tmp)
        mp.setenv("RAY_memory_monitor_refresh_ms", "0")
        yield tmp
        mp.undo()


@pytest.fixture(scope="module")
def local_ray(ray_env):
    """One local Ray instance for the module's in-process runs, shut down at its end."""
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=OBJECT_STORE, logging_level="ERROR"
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    file = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    file.write_text("".join(json.dumps({"id": pid, "prompt": t}) + "\n" for pid, t in PROMPTS))
    return file


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory) -> dict[str, asc.Trace]:
    """The local engine's traces of PROMPTS."""
    out = tmp_path_factory.mktemp("local") / "corpus"
    torch.set_num_threads(1)
    asc.analyze_corpus(
        "tiny-gpt2", PROMPTS, generate=GENERATE, out=out, batch_size=BATCH, progress=False
    )
    return {pid: asc.Trace.load(out / "prompts" / pid) for pid, _ in PROMPTS}


def assert_stored_once_like(
    out: Path, reference: dict[str, asc.Trace], atol: float = 1e-5, rtol: float = 0.0
):
    """``out/prompts`` holds each prompt exactly once, complete (no temporaries or leftovers),
    with the reference's tokens and statistics."""
    entries = sorted(p.name for p in (out / "prompts").iterdir())
    assert entries == sorted(reference)  # nothing hidden: no temporary or set-aside directory
    for pid, ref in reference.items():
        assert {f.name for f in (out / "prompts" / pid).iterdir()} == PROMPT_FILES
        got = asc.Trace.load(out / "prompts" / pid)
        assert got.token_ids == ref.token_ids and got.spans == ref.spans
        assert got.meta["prompt_id"] == pid and got.meta["text"] == ref.meta["text"]
        for table, ref_table in ((got.rows, ref.rows), (got.cols, ref.cols)):
            assert set(table) == set(ref_table)
            for name, value in table.items():
                torch.testing.assert_close(
                    value, ref_table[name], atol=atol, rtol=rtol, equal_nan=True
                )
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


# -- the Arrow rows workers return -------------------------------------------------------------
def test_rows_carry_the_run_files_of_the_local_engine(cache_dir, tmp_path):
    lm = asc.load("tiny-gpt2")
    trace = asc.analyze(lm, PROMPTS[5][1], generate=3, keep_qk=[1], progress=False)
    row = to_row("p05", trace, 1.5, "node", tmp_path)
    assert list(tmp_path.iterdir()) == []  # the scratch copy is gone
    table = pa.Table.from_pylist([row], schema=SCHEMA)  # what the worker returns
    files = from_row(table.to_pylist()[0])
    assert len(files) == len(trace) and files.save(tmp_path / "driver") == tmp_path / "driver"
    trace.save(tmp_path / "local")
    names = sorted(f.name for f in (tmp_path / "local").iterdir())
    assert names == ["qk.safetensors", "stats.parquet", "trace.json"]
    for name in ("qk.safetensors", "trace.json"):
        assert (tmp_path / "driver" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    # Parquet bytes may differ between two writes of one table (encoder state); the data may not
    stats = [pq.read_table(tmp_path / side / "stats.parquet") for side in ("driver", "local")]
    assert stats[0].equals(stats[1])
    assert (
        from_row(to_row("p06", "RuntimeError: boom", 1.5, "node", tmp_path)) == "RuntimeError: boom"
    )


def test_ray_options_need_engine_ray_and_a_corpus(prompts_file, tmp_path, capsys):
    base = ["analyze", "--model", "tiny-gpt2", "--out", str(tmp_path / "c")]
    assert main([*base, "--prompts", str(prompts_file), "--workers", "2"]) == 2
    assert "--workers need --engine ray" in capsys.readouterr().err
    assert main([*base, "--engine", "ray"]) == 2
    assert "add --prompts" in capsys.readouterr().err
    assert main([*base, "--prompts", str(prompts_file), "--engine", "ray", "--workers", "0"]) == 2
    assert "workers must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="engine must be"):
        asc.analyze_corpus("tiny-gpt2", ["a"], out=tmp_path / "d", engine="spark")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


# -- a simulated two-node cluster, driven by the command line ----------------------------------------
@pytest.mark.slow
def test_two_node_cluster_from_the_command_line(
    ray_env, cache_dir, prompts_file, reference, tmp_path
):
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": OBJECT_STORE,
            "include_dashboard": False,
        },
    )
    try:
        cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
        nodes = {node.node_id for node in cluster.list_all_nodes()}
        out = tmp_path / "runs" / "cluster"
        args = ["analyze", "--model", "tiny-gpt2", "--prompts", str(prompts_file)]
        args += ["--generate", str(GENERATE), "--batch-size", str(BATCH), "--out", str(out)]
        args += ["--engine", "ray", "--ray-address", cluster.address, "--workers", "2"]
        proc = subprocess.run(
            [sys.executable, "-m", "attnscope.cli", *args],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "40 prompts done, 0 skipped" in proc.stdout
    assert "tokens/s, model loading excluded" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("Ray nodes: "))
    worked = {part.split(" (")[0] for part in line.removeprefix("Ray nodes: ").split(", ")}
    assert worked == nodes and len(nodes) == 2  # both nodes analysed prompts
    assert_stored_once_like(out, reference)
    assert (out / "report.html").is_file()
    store = RunStore(out.parent)
    table = store.sql("SELECT count(DISTINCT prompt) AS n FROM stats WHERE run = 'cluster'")
    assert table.column("n").to_pylist() == [40]


# -- the local Ray instance: Python API, failures, a killed worker, resuming -------------------------
def test_python_api_on_two_workers_equals_the_local_engine(local_ray, reference, tmp_path):
    too_long = ("long", "word " * 2100)  # beyond tiny-gpt2's 2048 positions
    out = tmp_path / "c"
    summary = asc.analyze_corpus(
        "tiny-gpt2",
        [*PROMPTS, too_long],
        generate=GENERATE,
        out=out,
        batch_size=BATCH,
        progress=False,
        engine=RayEngine(workers=2, cpus_per_worker=0.5),  # 2 x 1 CPU would starve Ray Data
    )
    assert summary.done == [pid for pid, _ in PROMPTS] and list(summary.skipped) == ["long"]
    assert "longer than the context of 'tiny-gpt2'" in summary.skipped["long"]
    manifest = json.loads((out / "corpus.json").read_text())
    assert manifest["failed"] == summary.skipped and manifest["model"] == "tiny-gpt2"
    assert summary.tokens == sum(len(t) for t in reference.values()) and summary.seconds > 0
    assert sum(summary.nodes.values()) == 40
    assert_stored_once_like(out, reference)


@pytest.mark.slow
def test_killed_worker_is_replaced_and_every_prompt_stored_once(
    local_ray, reference, tmp_path, monkeypatch
):
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_WORKER, str(marker))  # travels to the workers with ATTNSCOPE_*
    out = tmp_path / "c"
    summary = asc.analyze_corpus(
        "tiny-gpt2", PROMPTS, generate=GENERATE, out=out, batch_size=BATCH, engine="ray"
    )
    assert marker.exists()  # the worker died after its first block; Ray restarted it
    assert len(summary.done) == 40 and summary.skipped == {}
    assert_stored_once_like(out, reference)


def test_rerun_resumes_and_clears_half_written_prompts(
    local_ray, prompts_file, reference, tmp_path, capsys
):
    out = tmp_path / "runs" / "c"
    args = ["analyze", "--model", "tiny-gpt2", "--prompts", str(prompts_file), "--out", str(out)]
    args += ["--generate", str(GENERATE), "--batch-size", str(BATCH), "--engine", "ray"]
    assert main(args) == 0
    assert "40 prompts done, 0 skipped" in capsys.readouterr().out
    # as if the driver had been killed: three prompts missing, one of them half-written
    for pid in ("p03", "p17", "p38"):
        (out / "prompts" / pid).rename(out / "prompts" / f".{pid}.attnscope-tmp-0123abcd")
    for f in (out / "prompts" / ".p03.attnscope-tmp-0123abcd").iterdir():
        f.write_bytes(f.read_bytes()[:10])
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "40 prompts done (37 from an earlier run), 0 skipped" in printed
    assert_stored_once_like(out, reference)


def test_fused_forward_on_ray_workers_equals_the_local_default(
    local_ray, reference, tmp_path, capsys
):
    """--fused with --engine ray: the workers' captured forwards are fused (exact_logits=False
    reaches them in the config), with the default capture's statistics."""
    some = PROMPTS[:6]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": pid, "prompt": t}) + "\n" for pid, t in some))
    out = tmp_path / "c"
    args = ["analyze", "--model", "tiny-gpt2", "--prompts", str(prompts), "--out", str(out)]
    args += ["--generate", str(GENERATE), "--batch-size", str(BATCH), "--engine", "ray"]
    assert main([*args, "--fused"]) == 0
    assert "6 prompts done, 0 skipped" in capsys.readouterr().out
    assert json.loads((out / "corpus.json").read_text())["parameters"]["exact_logits"] is False
    assert_stored_once_like(out, {pid: reference[pid] for pid, _ in some}, atol=1e-6, rtol=1e-4)
    for pid, _ in some:
        meta = asc.Trace.load(out / "prompts" / pid).meta
        assert meta["stats_config"]["exact_logits"] is False
        assert "fused forward" in meta["backend_reason"]


def test_output_to_a_filesystem_uri_is_staged_copied_and_resumed_from_the_uri(
    prompts_file, reference, tmp_path, capsys, monkeypatch
):
    """``--out file:///...`` goes through pyarrow's filesystem layer as s3:// or gs:// would; a
    rerun on "another machine" (empty staging) resumes from what the URI holds. The driver
    copies, whichever the engine: the local one keeps the test short."""
    remote = tmp_path / "shared" / "c"
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging-a"))
    args = ["analyze", "--model", "tiny-gpt2", "--prompts", str(prompts_file)]
    args += ["--out", remote.as_uri(), "--generate", str(GENERATE), "--batch-size", str(BATCH)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "40 prompts done, 0 skipped" in printed and f"copied to: {remote.as_uri()}" in printed
    assert {p.name for p in remote.iterdir()} == {"corpus.json", "prompts", "report.html"}
    assert_stored_once_like(remote, reference)
    # a driver killed while copying p17 (its trace.json, written last, is missing); p03 and p38
    # never reached the URI; the rerun runs elsewhere, with an empty staging directory
    (remote / "prompts" / "p17" / "trace.json").unlink()
    for pid in ("p03", "p38"):
        shutil.rmtree(remote / "prompts" / pid)
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging-b"))
    assert main(args) == 0
    assert "40 prompts done (37 from an earlier run), 0 skipped" in capsys.readouterr().out
    assert_stored_once_like(remote, reference)
    manifest = json.loads((remote / "corpus.json").read_text())
    assert manifest["prompts"] == [pid for pid, _ in PROMPTS] and manifest["failed"] == {}


@pytest.mark.parametrize("uri", ["nope://bucket/run", "hdfs://nohost/run"])
def test_an_output_uri_that_cannot_be_opened_is_named(uri):
    with pytest.raises(AttnscopeError, match=f"cannot open the output URI {uri}: .*local path"):
        asc.analyze_corpus("tiny-gpt2", PROMPTS[:2], out=uri, progress=False)


def test_a_model_or_workers_that_cannot_run_fail_plainly_and_leave_no_run(local_ray, tmp_path):
    with pytest.raises(AttnscopeError, match="ModelNotFoundError: unknown model 'no-such-model'"):
        asc.analyze_corpus("no-such-model", PROMPTS[:4], out=tmp_path / "c", engine="ray")
    assert not (tmp_path / "c").exists()
    with pytest.raises(AttnscopeError, match=r"the cluster has 0: use fewer GPUs per worker"):
        asc.analyze_corpus(
            "tiny-gpt2", PROMPTS[:4], out=tmp_path / "c", engine=RayEngine(gpus_per_worker=1)
        )
    with pytest.raises(AttnscopeError, match=r"use at most 2 worker\(s\) \(CLI: --workers 2\)"):
        asc.analyze_corpus(
            "tiny-gpt2", PROMPTS[:24], out=tmp_path / "c", engine=RayEngine(workers=3)
        )
    assert not (tmp_path / "c").exists()


# -- models spread over devices (accelerate device_map, CPU and disk offload) -----------------------
def offload_map(lm, on_disk: set[int]) -> dict[str, str]:
    """A device map that keeps the model on the CPU except the layers ``on_disk``, the input
    embedding and the (tied) head, which accelerate's hooks load from disk in every forward."""
    n_layers = lm.model.config.num_hidden_layers
    layers = {f"model.layers.{i}": "disk" if i in on_disk else "cpu" for i in range(n_layers)}
    rest = {f"model.{name}": "cpu" for name, _ in lm.model.model.named_children()}
    del rest["model.layers"]
    return {**rest, **layers, "model.embed_tokens": "disk", "lm_head": "disk"}


def assert_offloaded_capture_matches(plain, spread, text: str, atol: float = 1e-5):
    """The offloaded model's weights wait on the meta device; its captured statistics (one
    forward and a corpus run with generation) equal the single-device model's."""
    assert {p.device.type for p in spread.model.parameters()} == {"cpu", "meta"}
    ids = plain.tokenizer(text, return_tensors="pt").input_ids
    traces = []
    for lm in (plain, spread):
        with torch.no_grad(), asc.capture(lm.model) as cap:
            lm.model(input_ids=ids)
        traces.append(cap.trace)
    for name, value in traces[1].rows.items():
        torch.testing.assert_close(value, traces[0].rows[name], atol=atol, rtol=0, equal_nan=True)
    for name, value in traces[1].cols.items():
        torch.testing.assert_close(value, traces[0].cols[name], atol=atol, rtol=0, equal_nan=True)


def test_tiny_llama_offloaded_to_disk_gives_the_same_statistics(cache_dir, tmp_path):
    plain = asc.load("tiny-llama")
    spread = asc.load(
        "tiny-llama",
        device_map=offload_map(plain, on_disk={plain.model.config.num_hidden_layers - 1}),
        offload_folder=str(tmp_path / "offload"),
    )
    assert_offloaded_capture_matches(plain, spread, PROMPTS[12][1])
    texts = [t for _, t in PROMPTS[:6]]
    for name, lm in (("plain", plain), ("spread", spread)):
        summary = asc.analyze_corpus(
            lm, texts, generate=GENERATE, out=tmp_path / name, batch_size=3, progress=False
        )
        assert len(summary.done) == 6
    ref = {str(i): asc.Trace.load(tmp_path / "plain" / "prompts" / str(i)) for i in range(6)}
    assert_stored_once_like(tmp_path / "spread", ref)


@pytest.mark.slow
def test_gemma_with_half_its_layers_offloaded_gives_the_same_statistics(tmp_path):
    plain = asc.load("gemma3-270m")
    n_layers = plain.model.config.num_hidden_layers
    spread = asc.load(
        "gemma3-270m",
        device_map=offload_map(plain, on_disk=set(range(n_layers // 2, n_layers))),
        offload_folder=str(tmp_path / "offload"),
    )
    text = "In the old harbour town, the lighthouse keeper wrote every evening in a notebook. " * 3
    assert_offloaded_capture_matches(plain, spread, text)
