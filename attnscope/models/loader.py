"""``load(name_or_path)``: aliases (offline packaged weights), local directories and cached HF ids."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from attnscope.errors import ModelNotFoundError
from attnscope.models.loaded import Kind, LoadedModel
from attnscope.models.processors import Qwen2VLImageTextProcessor
from attnscope.models.registry import ALIASES, get_alias

_MODEL_CLASS: dict[Kind, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "encoder": "AutoModel",
    "speech": "AutoModelForSpeechSeq2Seq",
    "vlm": "AutoModelForImageTextToText",
}


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
    """
    name = str(name_or_path)
    alias = get_alias(name)
    if alias is not None:
        path, source = alias.locate(), f"alias:{name}"
    elif Path(name).expanduser().is_dir():
        path, source = Path(name).expanduser(), str(Path(name).expanduser().resolve())
    elif _looks_like_hf_id(name):
        path, source = name, f"hf:{name}"
    else:
        known = ", ".join(ALIASES)
        raise ModelNotFoundError(
            f"unknown model {name!r}: not an alias, a directory or an HF id. Known aliases: {known}. "
            "`attnscope models` lists them."
        )
    local_only = not download
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(_not_cached_message(name, err)) from err
    kind = detect_kind(config)
    model_cls = getattr(transformers, _MODEL_CLASS[kind])
    start = time.perf_counter()
    model = model_cls.from_pretrained(
        path,
        dtype=dtype,
        attn_implementation=attn_implementation,
        local_files_only=local_only,
        **model_kwargs,
    ).eval()
    tokenizer, processor = _load_preprocessors(path, config, kind, local_only)
    model.attnscope_load_seconds = time.perf_counter() - start
    return LoadedModel(model, tokenizer, processor, kind, name, source)


def _load_preprocessors(
    path: str | Path, config: PretrainedConfig, kind: Kind, local_only: bool
) -> tuple[Any, Any | None]:
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


def _not_cached_message(name: str, err: Exception) -> str:
    return (
        f"model {name!r} could not be loaded offline: it is not in the local Hugging Face cache "
        f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). Fetch it once on a machine with "
        f"network access (`huggingface-cli download {name}`), copy the cache directory here, or pass "
        "a local directory. Known aliases: " + ", ".join(ALIASES)
    )
