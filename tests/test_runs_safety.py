"""Nothing lost: --overwrite replaces only attnscope runs, one writer per run, and a writer killed
(SIGKILL) at any moment leaves only complete runs listed, with leftovers the next write removes."""

import json
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from filelock import FileLock
from PIL import Image

from attnscope import atomic
from attnscope.atomic import KILL_AT, lock_file, run_kind, write_dir_atomically
from attnscope.cli import main
from attnscope.errors import AttnscopeError, RunExistsError
from attnscope.store import RunStore
from attnscope.trace import Trace

pytestmark = pytest.mark.usefixtures("one_thread")

RUN_FILES = {"trace.json", "stats.parquet", "report.html"}  # every listed run has these
FILES = {  # and, by command, these
    "analyze": RUN_FILES,
    "vlm": RUN_FILES | {"overlays.html", "overlays"},
    "speech": RUN_FILES | {"speech.json", "encoder", "maps.safetensors", "figures"},
}
PROMPT_FILES = {"trace.json", "stats.parquet"}  # a corpus prompt's run
PROMPTS = [("a", "one two"), ("b", "one two three four"), ("c", "one two three four five six")]


@pytest.fixture(scope="module")
def inputs(cache_dir, tmp_path_factory) -> Path:
    """An image, one second of noise (tiny-whisper needs no speech) and a prompts file."""
    folder = tmp_path_factory.mktemp("inputs")
    rgb = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "image.png")
    sf.write(folder / "clip.wav", 0.1 * np.random.default_rng(0).standard_normal(16_000), 16_000)
    lines = [json.dumps({"id": pid, "prompt": text}) for pid, text in PROMPTS]
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def argv(command: str, out: Path, inputs: Path, prompt: str = "hello world") -> list[str]:
    """`attnscope` arguments of a quick run of ``command`` into ``out``."""
    speech = ["--transcript", "open the", "--saliency", "gxi", "--deletion", ""]
    corpus = ["--prompts", str(inputs / "prompts.jsonl"), "--generate", "2", "--batch-size", "1"]
    return [
        *{
            "analyze": ["analyze", "--model", "tiny-gpt2", "--prompt", prompt],
            "vlm": ["vlm", str(inputs / "image.png"), "--model", "tiny-llava", "--generate", "2"],
            "speech": ["speech", str(inputs / "clip.wav"), "--model", "tiny-whisper", *speech],
            "corpus": ["analyze", "--model", "tiny-gpt2", *corpus],
        }[command],
        "--out",
        str(out),
    ]


def hidden(root: Path) -> list[str]:
    """Hidden entries (temporaries, set-aside runs, lock files) anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def listed(root: Path, command: str) -> list[str]:
    """The runs RunStore lists under ``root``, each checked to hold all its files."""
    infos = RunStore(root).runs()
    for info in infos:
        need = PROMPT_FILES if info.prompt else FILES[command]
        assert need <= {p.name for p in info.path.iterdir()}, f"{info.name} is incomplete"
    return [info.name for info in infos]


def make_trace(seed: int = 0) -> Trace:
    g = torch.Generator().manual_seed(seed)
    return Trace(
        tokens=["a", "b", "c"],
        token_ids=[0, 1, 2],
        spans={"prompt": (0, 3)},
        layers=[0],
        n_heads=2,
        rows={"entropy": torch.rand(1, 2, 3, generator=g)},
        cols={"sink_score": torch.rand(1, 2, 3, generator=g)},
    )


def user_files(folder: Path) -> dict[str, str]:
    """A directory of someone's work, which attnscope must never remove."""
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.tex").write_text("x")
    (folder / "sub" / "data.csv").write_text("y")
    return contents(folder)


def contents(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}


# -- --overwrite replaces attnscope runs only --------------------------------------------------------
@pytest.mark.parametrize("command", ["analyze", "vlm", "speech", "corpus"])
def test_overwrite_refuses_a_directory_that_is_not_a_run(command, inputs, tmp_path, capsys):
    before = user_files(tmp_path / "d")
    assert main([*argv(command, tmp_path / "d", inputs), "--overwrite"]) == 2
    assert "is not an attnscope run: refusing to overwrite it" in capsys.readouterr().err
    assert contents(tmp_path / "d") == before and hidden(tmp_path) == []


@pytest.mark.parametrize("command", ["analyze", "vlm", "speech", "corpus"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_file_as_out_is_never_replaced(command, overwrite, inputs, tmp_path, capsys):
    (tmp_path / "notes").write_text("keep me")
    assert main([*argv(command, tmp_path / "notes", inputs), *overwrite]) == 2
    err = capsys.readouterr().err
    assert "exists and is not a" in err and "choose another out directory" in err
    assert (tmp_path / "notes").read_text() == "keep me" and hidden(tmp_path) == []


def test_what_counts_as_a_run(inputs, tmp_path):
    """trace.json is also what Chrome's profiler writes, corpus.json a common data file name."""
    assert main(argv("corpus", tmp_path / "corpus", inputs)) == 0
    chrome = tmp_path / "profile"
    chrome.mkdir()
    (chrome / "trace.json").write_text(json.dumps({"traceEvents": []}))
    (chrome / "stats.parquet").write_text("not ours")
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "corpus.json").write_text(json.dumps({"format": "jsonl", "prompts": ["a"]}))
    make_trace().save(tmp_path / "run")
    no_stats = tmp_path / "no_stats"
    no_stats.mkdir()
    (no_stats / "trace.json").write_text((tmp_path / "run" / "trace.json").read_text())
    (tmp_path / "link").symlink_to(tmp_path / "run")
    kinds = {p.name: run_kind(p) for p in tmp_path.iterdir()}
    assert kinds == {
        "profile": None,
        "texts": None,
        "run": "trace",
        "no_stats": None,
        "link": None,
        "corpus": "corpus",
    }
    for folder in (chrome, texts, no_stats):
        before = contents(folder)
        with pytest.raises(AttnscopeError, match="is not an attnscope run: refusing to overwrite"):
            make_trace().save(folder, overwrite=True)
        assert contents(folder) == before
    with pytest.raises(AttnscopeError, match="symbolic link"):
        make_trace().save(tmp_path / "link", overwrite=True)
    assert (tmp_path / "link").is_symlink() and run_kind(tmp_path / "run") == "trace"


def test_overwrite_replaces_a_run_and_an_empty_directory_may_be_used(inputs, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(argv("analyze", tmp_path / "empty", inputs)) == 0  # no --overwrite needed
    assert main([*argv("analyze", tmp_path / "empty", inputs, "second"), "--overwrite"]) == 0
    assert Trace.load(tmp_path / "empty").meta["text"] == "second"
    assert listed(tmp_path, "analyze") == ["empty"] and hidden(tmp_path) == []


# -- one writer per run --------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["analyze", "vlm", "speech"])
def test_a_second_writer_is_refused(command, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(atomic, "LOCK_WAIT_S", 0)
    out = tmp_path / "run"
    with FileLock(str(lock_file(out))):  # what a writer of the run holds
        assert main(argv(command, out, inputs)) == 2
    assert f"another process is writing the run {out}" in capsys.readouterr().err
    assert not out.exists()


def test_a_run_that_appears_meanwhile_is_not_replaced(tmp_path):
    """The final rename re-checks: without overwrite nothing that appeared is replaced, with it
    only an attnscope run is."""
    out = tmp_path / "run"
    with pytest.raises(RunExistsError, match="already exists"):
        write_dir_atomically(out, lambda tmp: make_trace(1).save(out))  # another writer's run
    assert torch.equal(Trace.load(out).rows["entropy"], make_trace(1).rows["entropy"])

    def someone_elses(tmp: Path) -> None:
        user_files(tmp_path / "other")

    with pytest.raises(AttnscopeError, match="not an attnscope run: refusing to overwrite"):
        write_dir_atomically(tmp_path / "other", someone_elses, overwrite=True)
    assert contents(tmp_path / "other") == {"thesis.tex": "x", "sub/data.csv": "y"}
    assert hidden(tmp_path) == []


def test_a_newer_corpus_format_is_not_resumed(inputs, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(argv("corpus", out, inputs)) == 0
    manifest = json.loads((out / "corpus.json").read_text())
    (out / "corpus.json").write_text(json.dumps({**manifest, "format_version": 2}))
    assert main(argv("corpus", out, inputs)) == 2
    assert "format version 2, which this attnscope (version 1) cannot resume: upgrade" in (
        capsys.readouterr().err
    )
    assert json.loads((out / "corpus.json").read_text())["format_version"] == 2


def test_sweep_removes_only_what_dead_writers_left(tmp_path):
    make_trace(0).save(tmp_path / "gone")
    (tmp_path / "gone").rename(tmp_path / ".gone.attnscope-old-99")  # killed before the rename
    make_trace(1).save(tmp_path / "kept")
    make_trace(2).save(tmp_path / "old")
    (tmp_path / "old").rename(tmp_path / ".kept.attnscope-old-98")  # killed before its removal
    others = [".git", ".keep.lock", ".notes.tmp-1", ".x.attnscope-tmp-"]  # not ours
    live = [".live.attnscope-lock", ".live.attnscope-tmp-0a1b2c3d"]
    with FileLock(str(lock_file(tmp_path / "live"))):  # a live writer
        for name in others:
            (tmp_path / name).write_text("keep me")
        for name in [".dead.attnscope-tmp-0a1b2c3d", live[1]]:
            (tmp_path / name).mkdir()
            (tmp_path / name / "stats.parquet").write_text("half written")
        (tmp_path / ".dead.attnscope-lock").touch()  # its writer was killed
        atomic.sweep(tmp_path)
        assert hidden(tmp_path) == sorted([*others, *live])
        assert (tmp_path / live[1] / "stats.parquet").read_text() == "half written"
    assert torch.equal(Trace.load(tmp_path / "gone").rows["entropy"], make_trace(0).rows["entropy"])
    assert torch.equal(Trace.load(tmp_path / "kept").rows["entropy"], make_trace(1).rows["entropy"])


# -- kill -9 -----------------------------------------------------------------------------------------
def _killed_child(point: str, args: list[str]) -> None:
    os.environ[KILL_AT] = point
    sys.exit(main(args))


KILLS = [  # command, POINT:NAME, what the store lists right after the kill
    ("analyze", "tmp:run", []),  # the temporary directory made, nothing in it
    ("analyze", "filled:report.html", []),  # while writing: the report half-way
    ("analyze", "filled:run", []),  # the temporary directory complete, not renamed
    ("analyze", "renamed:run", ["run"]),  # in place, the lock file not yet removed
    ("analyze", "aside:run", []),  # --overwrite: the old run moved aside, the new one not in
    ("vlm", "filled:overlays.html", []),
    ("vlm", "renamed:run", ["run"]),
    ("speech", "renamed:encoder", []),  # the encoder trace in place inside the temporary run
    ("speech", "renamed:run", ["run"]),
    ("corpus", "tmp:c", []),  # the corpus run being made
    ("corpus", "filled:corpus.json", []),  # its manifest being rewritten
    ("corpus", "renamed:b", ["c/a", "c/b"]),  # two prompts stored, the third not
    ("corpus", "filled:report.html", ["c/a", "c/b", "c/c"]),  # the corpus report half-way
]


@pytest.mark.parametrize(
    ("command", "point", "after_kill"), KILLS, ids=[f"{k[0]}-{k[1]}" for k in KILLS]
)
def test_kill_9_leaves_only_complete_runs(command, point, after_kill, inputs, tmp_path):
    root = tmp_path / "runs"
    out = root / ("c" if command == "corpus" else "run")
    args = argv(command, out, inputs)
    if point.startswith("aside"):
        assert main(argv(command, out, inputs, prompt="the old run")) == 0
        args.append("--overwrite")
    child = multiprocessing.get_context("fork").Process(target=_killed_child, args=(point, args))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL  # killed at the point, not finished or failed
    assert hidden(root)  # it left something behind
    assert listed(root, command) == after_kill

    # the next write into the directory (a corpus: the same command, which resumes) clears up
    if command == "corpus":
        assert main(args) == 0
        assert listed(root, command) == ["c/a", "c/b", "c/c"]
        assert (out / "report.html").is_file()
    else:
        assert main(argv(command, root / "next", inputs)) == 0
        kept = ["run", "next"] if after_kill or point.startswith("aside") else ["next"]
        assert listed(root, command) == sorted(kept)
    if point.startswith("aside"):  # the replacement never arrived: the old run is back
        assert Trace.load(out).meta["text"] == "the old run"
    assert hidden(root) == []
