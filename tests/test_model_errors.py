"""Damaged weights and bad model names: one clear error naming the file and the remedy.

Tiny models are built into a fresh cache (``cache_dir``); tests damage copies of their directories,
or the cache entry itself.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import huggingface_hub
import pytest

from attnscope.cli import main
from attnscope.errors import AttnscopeError, ModelNotFoundError
from attnscope.models import cache
from attnscope.models.loader import load
from attnscope.models.registry import ALIASES
from attnscope.models.whisper_ct2 import convert_ct2_whisper

WEIGHTS = "model.safetensors"


def _copy(alias: str, dst: Path) -> Path:
    """A copy of the (built, intact) directory of ``alias``, without the cache manifest."""
    shutil.copytree(ALIASES[alias].locate(), dst, ignore=shutil.ignore_patterns(cache.MARKER))
    return dst


def _truncate(file: Path, size: int) -> None:
    data = file.read_bytes()
    assert len(data) > size
    file.write_bytes(data[:size])


@pytest.fixture
def gpt2_dir(cache_dir: Path, tmp_path: Path) -> Path:
    return _copy("tiny-gpt2", tmp_path / "tiny-gpt2")


def _models_table(capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """``attnscope models``: alias -> its "cached" column."""
    assert main(["models"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    return {row.split()[0]: row.split()[2] for row in rows}


def test_intact_copy_loads(gpt2_dir: Path) -> None:
    loaded = load(gpt2_dir)
    assert loaded.kind == "causal-lm"
    assert loaded.source == str(gpt2_dir.resolve())


@pytest.mark.parametrize("damage", ["half", "header", "empty", "grown"])
def test_damaged_safetensors_in_a_local_dir_names_the_file(gpt2_dir: Path, damage: str) -> None:
    weights = gpt2_dir / WEIGHTS
    size = weights.stat().st_size
    if damage == "grown":
        weights.write_bytes(weights.read_bytes() + b"\0" * 16)
    else:
        _truncate(weights, {"half": size // 2, "header": 40, "empty": 0}[damage])
    with pytest.raises(AttnscopeError, match="truncated or corrupt") as err:
        load(gpt2_dir)
    assert str(weights) in str(err.value)
    assert "copy or download the complete model again" in str(err.value)
    assert "\n" not in str(err.value)


def test_directory_without_weights(gpt2_dir: Path) -> None:
    (gpt2_dir / WEIGHTS).unlink()
    with pytest.raises(AttnscopeError, match="holds no weights") as err:
        load(gpt2_dir)
    assert str(gpt2_dir) in str(err.value)
    assert "model.safetensors" in str(err.value)


def test_sharded_index_with_a_missing_shard(gpt2_dir: Path) -> None:
    (gpt2_dir / WEIGHTS).rename(gpt2_dir / "model-00001-of-00002.safetensors")
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (gpt2_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    with pytest.raises(AttnscopeError, match="is missing") as err:
        load(gpt2_dir)
    assert str(gpt2_dir / "model-00002-of-00002.safetensors") in str(err.value)


def test_directory_without_config(gpt2_dir: Path) -> None:
    (gpt2_dir / "config.json").unlink()
    with pytest.raises(AttnscopeError, match=r"no config\.json") as err:
        load(gpt2_dir)
    assert str(gpt2_dir) in str(err.value)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
def test_corrupt_json_names_the_file(gpt2_dir: Path, name: str) -> None:
    _truncate(gpt2_dir / name, 20)
    with pytest.raises(AttnscopeError, match="is not valid JSON") as err:
        load(gpt2_dir)
    message = str(err.value)
    assert message.startswith(str(gpt2_dir / name))
    assert "hf download" not in message and "huggingface-cli" not in message


def test_corrupt_processor_config_names_the_file(cache_dir: Path, tmp_path: Path) -> None:
    whisper = _copy("tiny-whisper", tmp_path / "tiny-whisper")
    (whisper / "processor_config.json").unlink(missing_ok=True)
    (whisper / "preprocessor_config.json").write_text('{"feature_size": 80,')
    with pytest.raises(AttnscopeError, match=r"preprocessor_config\.json is not valid JSON"):
        load(whisper)


def test_weights_only_false_is_refused(gpt2_dir: Path) -> None:
    with pytest.raises(ValueError, match="weights_only=False is refused"):
        load(gpt2_dir, weights_only=False)


def test_unknown_name_lists_the_aliases() -> None:
    with pytest.raises(ModelNotFoundError, match="neither an alias") as err:
        load("no-such-model")
    assert all(alias in str(err.value) for alias in ALIASES)
    assert "download" not in str(err.value)


@pytest.mark.parametrize("name", ["./no/such/dir", "no/such/dir", "/no/such/dir", "~/no-such-dir"])
def test_missing_local_path(name: str) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist") as err:
        load(name)
    assert "download" not in str(err.value)


def test_a_file_is_not_a_model_directory(gpt2_dir: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="is a file, not a model directory"):
        load(gpt2_dir / "config.json")


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty local Hugging Face hub cache."""
    root = tmp_path / "hf-hub"
    root.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def test_uncached_hf_id_says_how_to_download(hf_cache: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache") as err:
        load("some-org/some-model")
    assert "hf download some-org/some-model" in str(err.value)
    assert str(hf_cache) in str(err.value)


def test_cached_hf_id_loads_and_names_its_damaged_weights(cache_dir: Path, hf_cache: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_cache / "models--some-org--tiny"
    snapshot = _copy("tiny-gpt2", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert load("some-org/tiny").source == "hf:some-org/tiny"

    _truncate(snapshot / WEIGHTS, 1000)
    with pytest.raises(AttnscopeError, match="truncated or corrupt") as err:
        load("some-org/tiny")
    assert str(snapshot / WEIGHTS) in str(err.value)
    assert "hf download some-org/tiny --force-download" in str(err.value)


def test_damaged_cache_entry_is_reported_and_rebuilt(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = ALIASES["tiny-gpt2"].locate()
    weights = entry / WEIGHTS
    size = weights.stat().st_size
    assert _models_table(capsys)["tiny-gpt2"] == "yes"

    _truncate(weights, size - 100)
    assert _models_table(capsys)["tiny-gpt2"] == "damaged"
    with pytest.warns(
        UserWarning,
        match=f"{re.escape(str(entry))}.*damaged.*{re.escape(WEIGHTS)} has {size - 100} bytes",
    ):
        loaded = load("tiny-gpt2")
    assert loaded.kind == "causal-lm"
    assert weights.stat().st_size == size
    assert _models_table(capsys)["tiny-gpt2"] == "yes"
    assert not list(cache_dir.glob(".tiny-gpt2-*"))  # no temporary or damaged leftovers


def test_entry_of_an_older_attnscope_is_used_while_its_weights_parse(cache_dir: Path) -> None:
    """Entries built before manifests hold ``ok`` in the marker: their weights are still checked."""
    entry = ALIASES["tiny-gpt2"].locate()
    (entry / cache.MARKER).write_text("ok\n")
    built = (entry / WEIGHTS).stat().st_mtime_ns
    assert cache.entry_state(ALIASES["tiny-gpt2"].cache_key) == "complete"
    assert ALIASES["tiny-gpt2"].locate() == entry
    assert (entry / WEIGHTS).stat().st_mtime_ns == built  # not rebuilt

    _truncate(entry / WEIGHTS, 1000)
    assert cache.entry_state(ALIASES["tiny-gpt2"].cache_key) == "damaged"
    with pytest.warns(UserWarning, match="model.safetensors is unreadable"):
        load("tiny-gpt2")
    assert "files" in json.loads((entry / cache.MARKER).read_text())  # rebuilt with a manifest


def test_manifest_records_every_file(cache_dir: Path) -> None:
    entry = ALIASES["tiny-gpt2"].locate()
    files = json.loads((entry / cache.MARKER).read_text())["files"]
    on_disk = {p.name for p in entry.iterdir()} - {cache.MARKER}
    assert set(files) == on_disk
    assert files[WEIGHTS]["size"] == (entry / WEIGHTS).stat().st_size
    assert len(files[WEIGHTS]["sha256"]) == 64


def test_cli_analyze_with_a_damaged_dir_exits_2(
    gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _truncate(gpt2_dir / WEIGHTS, 5000)
    rc = main(
        ["analyze", "--model", str(gpt2_dir), "--out", str(tmp_path / "run"), "--prompt", "Hi"]
    )
    assert rc == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1
    assert errors[0].startswith(f"attnscope: error: {gpt2_dir / WEIGHTS} is truncated or corrupt")
    assert not (tmp_path / "run").exists()


def test_ct2_converter_names_a_corrupt_config(tmp_path: Path) -> None:
    """A CTranslate2 model.bin with no variables, beside a truncated config.json."""
    spec = b"WhisperSpec\0"
    header = struct.pack("<IH", 6, len(spec)) + spec + struct.pack("<III", 3, 0, 0)
    (tmp_path / "model.bin").write_bytes(header)  # version 6, revision 3, no variables, no aliases
    (tmp_path / "config.json").write_text('{"suppress_ids": [1, 2')
    with pytest.raises(AttnscopeError, match=r"config\.json is not valid JSON") as err:
        convert_ct2_whisper(tmp_path, tmp_path / "out")
    assert str(err.value).startswith(str(tmp_path / "config.json"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_vision_transformer_loads_without_a_tokenizer_and_refuses_text(
    tmp_path: Path, capsys
) -> None:
    lm = load("dinov2-small")
    assert lm.kind == "encoder" and lm.tokenizer is None
    out = tmp_path / "run"
    assert main(["analyze", "--model", "dinov2-small", "--prompt", "hi", "--out", str(out)]) != 0
    assert "'dinov2-small' reads images, not text" in capsys.readouterr().err
    assert not out.exists()
