"""Tiny random models: built offline into the cache, loaded, run, and rebuilt identically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
)

from attnscope.models import cache, tiny
from attnscope.models.loader import detect_kind, load
from attnscope.models.registry import ALIASES

TINY = ["tiny-gpt2", "tiny-llama", "tiny-whisper", "tiny-llava", "tiny-qwen2-vl"]


@pytest.fixture(autouse=True)
def tiny_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty attnscope cache for each test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(root))
    return root


def _gradient(height: int, width: int) -> Image.Image:
    """An RGB image: red grows left to right, green top to bottom."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width)[None, :]
    pixels[..., 1] = np.linspace(0, 255, height)[:, None]
    return Image.fromarray(pixels)


@pytest.mark.parametrize("alias", TINY)
def test_config_kind_matches_registry(alias: str) -> None:
    config = AutoConfig.from_pretrained(ALIASES[alias].locate())
    assert detect_kind(config) == ALIASES[alias].kind


@pytest.mark.parametrize("alias", TINY)
def test_build_is_deterministic(alias: str, tmp_path: Path) -> None:
    build = getattr(tiny, f"build_{alias.replace('-', '_')}")
    first, second = tmp_path / "a", tmp_path / "b"
    build(first)
    build(second)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    weights_a, weights_b = (load_file(d / "model.safetensors") for d in (first, second))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    for name in names:
        if name != "model.safetensors":
            assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.mark.parametrize("alias", TINY)
def test_tokenizer_round_trips_text(alias: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(ALIASES[alias].locate())
    text = "The answer is 42."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama"])
def test_causal_lm_runs_long_prompts(alias: str) -> None:
    loaded = load(alias)
    assert loaded.kind == "causal-lm"
    assert loaded.processor is None
    ids = loaded.tokenizer("The quick brown fox, 1969. " * 60, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 300
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], loaded.model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_llama_uses_grouped_query_attention() -> None:
    config = load("tiny-llama").model.config
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.num_attention_heads % config.num_key_value_heads == 0


def test_llava_processor_expands_image_tokens() -> None:
    loaded = load("tiny-llava")
    assert loaded.kind == "vlm"
    config = loaded.model.config
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    inputs = loaded.processor(images=_gradient(48, 80), text=prompt, return_tensors="pt")
    vision = config.vision_config
    # "default" feature selection drops CLIP's CLS token: one image token per patch.
    expected = (vision.image_size // vision.patch_size) ** 2
    assert (inputs["input_ids"] == config.image_token_index).sum().item() == expected
    assert inputs["pixel_values"].shape == (1, 3, vision.image_size, vision.image_size)
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], config.text_config.vocab_size)


def test_qwen2_vl_forward_with_image() -> None:
    """Inputs built as Qwen2VLProcessor would (it cannot be built here, see the next test)."""
    path = ALIASES["tiny-qwen2-vl"].locate()
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    config = model.config
    names = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
    assert tokenizer.convert_tokens_to_ids(names) == [
        config.vision_start_token_id,
        config.image_token_id,
        config.vision_end_token_id,
        config.video_token_id,
    ]
    image = image_processor(images=_gradient(64, 80), return_tensors="pt")
    merge = config.vision_config.spatial_merge_size
    n_image_tokens = int(image["image_grid_thw"].prod()) // merge**2
    assert 4 <= n_image_tokens <= 16  # min_pixels / max_pixels keep images small
    text = f"<|vision_start|>{'<|image_pad|>' * n_image_tokens}<|vision_end|>Describe it."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    mm_token_type_ids = (ids == config.image_token_id).int()
    with torch.no_grad():
        logits = model(input_ids=ids, mm_token_type_ids=mm_token_type_ids, **image).logits
    assert logits.shape == (1, ids.shape[1], config.text_config.vocab_size)


def test_qwen2_vl_loads_with_processor() -> None:
    """Through load(): transformers' processor, or attnscope's torchvision-free one."""
    loaded = load("tiny-qwen2-vl")
    assert loaded.kind == "vlm"
    text = "<|vision_start|><|image_pad|><|vision_end|>Describe it."
    inputs = loaded.processor(images=_gradient(64, 80), text=text, return_tensors="pt")
    merge = loaded.model.config.vision_config.spatial_merge_size
    expected = int(inputs["image_grid_thw"].prod()) // merge**2
    assert (inputs["input_ids"] == loaded.model.config.image_token_id).sum().item() == expected
    with torch.no_grad():
        loaded.model(**inputs)


def test_whisper_generates_from_one_second_of_noise() -> None:
    loaded = load("tiny-whisper")
    assert loaded.kind == "speech"
    audio = np.random.default_rng(0).standard_normal(16_000).astype(np.float32) * 0.1
    features = loaded.processor(audio, sampling_rate=16_000, return_tensors="pt")["input_features"]
    assert features.shape == (1, 80, 3000)  # padded to the 30 s window
    with torch.no_grad():
        ids = loaded.model.generate(features, max_new_tokens=5)
    assert ids.dtype == torch.long and ids.shape[0] == 1 and 1 <= ids.shape[1] <= 5 + 3
    assert int(ids.max()) < loaded.model.config.vocab_size
    assert isinstance(loaded.tokenizer.decode(ids[0]), str)


def test_incomplete_cache_entry_is_rebuilt(tiny_cache: Path) -> None:
    alias = ALIASES["tiny-gpt2"]
    entry = tiny_cache / alias.cache_key
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{ half-written")
    assert cache.entry_state(alias.cache_key) == "damaged"
    with pytest.warns(UserWarning, match=r"damaged \(it has no \.complete manifest"):
        loaded = load("tiny-gpt2")
    assert loaded.kind == "causal-lm"
    assert cache.entry_state(alias.cache_key) == "complete"
    assert AutoConfig.from_pretrained(entry).model_type == "gpt2"
