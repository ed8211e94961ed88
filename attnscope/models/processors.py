"""Processors that transformers cannot build on this stack.

transformers 5.23's ``Qwen2VLProcessor`` requires a video processor that requires torchvision,
and torchvision cannot be installed beside the CPU torch build (ENVIRONMENT.md). Images need only
the PIL image processor plus the token expansion the processor performs, which this class does.
"""

from __future__ import annotations

from typing import Any

from transformers import BatchFeature


class Qwen2VLImageTextProcessor:
    """Image + text processor for Qwen2-VL without torchvision.

    Each ``<|image_pad|>`` in the text stands for one image and is expanded to
    ``image_grid_thw.prod() // merge_size**2`` tokens, as ``Qwen2VLProcessor`` does.
    """

    image_token = "<|image_pad|>"

    def __init__(self, tokenizer: Any, image_processor: Any) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        return_tensors: str = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        features: dict[str, Any] = {}
        if images is not None:
            features = dict(self.image_processor(images=images, return_tensors=return_tensors))
            merge = self.image_processor.merge_size
            counts = iter((features["image_grid_thw"].prod(-1) // merge**2).tolist())
            texts = [self._expand(t, counts) for t in texts]
        encoded = self.tokenizer(texts, return_tensors=return_tensors, **kwargs)
        encoded["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).int()
        return BatchFeature({**encoded, **features}, tensor_type=return_tensors)

    def _expand(self, text: str, counts: Any) -> str:
        parts = text.split(self.image_token)
        out = parts[0]
        for part in parts[1:]:
            try:
                n = next(counts)
            except StopIteration as err:
                raise ValueError("more <|image_pad|> tokens in the text than images") from err
            out += self.image_token * int(n) + part
        return out

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)
