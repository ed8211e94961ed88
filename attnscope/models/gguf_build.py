"""GGUF -> float32 safetensors, the shared path of the GGUF-packaged aliases (Gemma, SmolLM2).

Loading a GGUF file de-quantizes every tensor (about a minute), so it is done once, into the
attnscope cache; the saved directory then reloads in seconds.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig

from attnscope.errors import MissingDependencyError

Progress = Callable[[str], None]


def progress_printer(name: str) -> Progress:
    """``progress(stage)`` printing ``name [seconds since now] stage`` to stderr."""
    start = time.perf_counter()

    def progress(stage: str) -> None:
        print(f"{name} [{time.perf_counter() - start:5.1f} s] {stage}", file=sys.stderr)

    return progress


def require_gguf(what: str) -> None:
    """Refuse early, with the install command, when the gguf package is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            f"reading the {what} GGUF file needs the gguf package: pip install gguf"
        )


def convert_gguf(gguf_dir: Path, gguf_file: str, dst: Path, progress: Progress) -> PreTrainedConfig:
    """De-quantize ``gguf_dir/gguf_file`` and save it to ``dst`` as a float32 model without
    quantization config, with its tokenizer (chat template included) and generation config.
    Returns the config read from the GGUF file, for the caller's checks of the saved one."""
    progress("de-quantizing the GGUF weights to float32")
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.float32
    )
    progress("reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    progress("rebuilding the model without its quantization config")
    gguf_config = quantized.config
    model = AutoModelForCausalLM.from_config(_without_quantization(gguf_config))
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    del quantized
    progress(f"saving float32 safetensors to {dst}")
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return gguf_config


def _without_quantization(config: PreTrainedConfig) -> PreTrainedConfig:
    """A copy of ``config`` without ``quantization_config``: save_pretrained refuses GGUF models."""
    values = config.to_dict()
    values.pop("quantization_config", None)
    return type(config).from_dict(values)
