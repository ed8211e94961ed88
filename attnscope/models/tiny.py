"""Tiny random models for tests: complete HF directories built offline in a second or two.

Every builder ``build_<alias>(dst)`` writes config, safetensors weights and tokenizer / processor
files that ``attnscope.models.loader.load`` reads back offline (tiny-qwen2-vl: model, tokenizer and
image processor only, see its builder). Weights are drawn after
``torch.manual_seed(0)``, so two builds are identical. All text models share one byte-level BPE
tokenizer trained on ``_CORPUS`` (any text encodes); only their special tokens differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A model reads a sentence one token at a time, and
each attention head decides which of the earlier tokens matter for the next one. Some heads look
at the previous token; others look back at the first token of the text, or at a token that
appeared before in the same context.

In 1969, two astronauts walked on the Moon; 600 million people watched. The answer is 42, said
the computer, after 7.5 million years of thought. Prices rose by 3.2% in March, 4.1% in April and
0.9% in May: about 8.4% in three months! Call 555-0123 before 10:30 a.m., or write to us at
12 High Street.

What is the capital of France? Paris is. Which number comes after 99? It is 100. She asked: "Can
you see the image?" He said, "Yes - a red square, a blue circle and a green line (on white)."
Speech becomes text, images become patches, and words become numbers; then everything is just
vectors, queries, keys and values.
"""

_TEXT_SPECIALS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}
_HIDDEN, _HEADS, _LAYERS, _FFN = 64, 4, 2, 128
_MAX_POSITIONS = 2048


def _train_bpe(vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE tokenizer trained on ``_CORPUS``; special tokens are added after its vocab."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.split("\n\n"), trainer)
    return tokenizer


def _text_tokenizer(extra_specials: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """The shared tokenizer with bos/eos/pad/unk and ``extra_specials`` (e.g. image tokens)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(),
        extra_special_tokens=list(extra_specials),
        model_max_length=_MAX_POSITIONS,
        **_TEXT_SPECIALS,
    )


def _special_ids(tokenizer: Any) -> dict[str, int]:
    """bos/eos/pad token ids as config keyword arguments."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _llama_text_config(tokenizer: Any) -> dict[str, Any]:
    """Keyword arguments of a tiny Llama-style decoder with grouped-query attention (4 / 2 heads)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": _HIDDEN,
        "intermediate_size": _FFN,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": _HEADS // 2,
        "max_position_embeddings": _MAX_POSITIONS,
        **_special_ids(tokenizer),
    }


def _save(
    dst: Path,
    model_cls: type[PreTrainedModel],
    config: PreTrainedConfig,
    *preprocessors: Any,
    generation_config: GenerationConfig | None = None,
) -> None:
    """Build ``model_cls(config)`` with seed 0 and save it with its tokenizer / processor files."""
    torch.manual_seed(0)
    model = model_cls(config).eval()
    if generation_config is not None:
        model.generation_config = generation_config
    model.save_pretrained(dst)
    for preprocessor in preprocessors:
        preprocessor.save_pretrained(dst)


def build_tiny_gpt2(dst: Path) -> None:
    """GPT-2: 2 layers, 4 heads, d 64, 2048 positions."""
    tokenizer = _text_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=_MAX_POSITIONS,
        n_embd=_HIDDEN,
        n_layer=_LAYERS,
        n_head=_HEADS,
        n_inner=_FFN,
        **_special_ids(tokenizer),
    )
    _save(dst, GPT2LMHeadModel, config, tokenizer)


def build_tiny_llama(dst: Path) -> None:
    """Llama: 2 layers, 4 query heads sharing 2 KV heads, d 64."""
    tokenizer = _text_tokenizer()
    _save(dst, LlamaForCausalLM, LlamaConfig(**_llama_text_config(tokenizer)), tokenizer)


def build_tiny_whisper(dst: Path) -> None:
    """Whisper (English-only): 2+2 layers, 4 heads, d 64, 80 mel bins, 30 s windows."""
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]
    # Specials follow the text vocabulary and <|notimestamps|> comes last, as in Whisper: generate()
    # reads every id above it as a timestamp.
    tokenizer = WhisperTokenizer(
        tokenizer_object=_train_bpe(),
        extra_special_tokens=specials[1:],
        model_max_length=448,
    )
    eot, sot, no_timestamps = tokenizer.convert_tokens_to_ids(specials)
    token_ids = {
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
    }
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=_HIDDEN,
        encoder_layers=_LAYERS,
        decoder_layers=_LAYERS,
        encoder_attention_heads=_HEADS,
        decoder_attention_heads=_HEADS,
        encoder_ffn_dim=_FFN,
        decoder_ffn_dim=_FFN,
        max_source_positions=1500,
        max_target_positions=448,
        **token_ids,
    )
    generation_config = GenerationConfig(
        **token_ids,
        begin_suppress_tokens=[eot],
        is_multilingual=False,
        no_timestamps_token_id=no_timestamps,
    )
    processor = WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer)
    _save(
        dst,
        WhisperForConditionalGeneration,
        config,
        processor,
        generation_config=generation_config,
    )


def build_tiny_llava(dst: Path) -> None:
    """LLaVA: CLIP vision tower (64 px, 8 px patches, 2 layers) + the tiny Llama; 64 image tokens."""
    tokenizer = _text_tokenizer(("<image>",))
    image_size, patch_size = 64, 8
    vision = CLIPVisionConfig(
        hidden_size=_HIDDEN,
        intermediate_size=_FFN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=_HIDDEN,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_llama_text_config(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drop CLS: one token per patch
        projector_hidden_act="gelu",
    )
    # The PIL image processor, so that no torchvision is needed to load or run it.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, removed again by "default"
    )
    _save(dst, LlavaForConditionalGeneration, config, processor)


def build_tiny_qwen2_vl(dst: Path) -> None:
    """Qwen2-VL: 2-layer vision tower (14 px patches, 2x2 merge) + 2-layer GQA decoder.

    Saves the tokenizer and the PIL image processor but no ``Qwen2VLProcessor``: in transformers
    5.23 that processor requires a ``Qwen2VLVideoProcessor``, which requires torchvision, both to
    be constructed and to be loaded by ``AutoProcessor``. Prompts expand ``<|image_pad|>`` to
    ``image_grid_thw.prod() // merge_size**2`` tokens, as the processor would.
    """
    image_specials = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    tokenizer = _text_tokenizer(image_specials)
    start, end, image, video = tokenizer.convert_tokens_to_ids(list(image_specials))
    text = _llama_text_config(tokenizer) | {
        # mrope_section splits the head_dim // 2 = 8 rotary frequencies over time, height, width.
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
    }
    vision = {
        "depth": _LAYERS,
        "embed_dim": _HIDDEN,
        "hidden_size": _HIDDEN,  # output width of the patch merger = text hidden size
        "num_heads": _HEADS,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )
    # 56x56 to 112x112 pixels after resizing: 4 to 16 image tokens.
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )
    _save(dst, Qwen2VLForConditionalGeneration, config, tokenizer, image_processor)
