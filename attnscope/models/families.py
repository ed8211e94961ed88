"""The model-family table: where each family's attention stacks sit and what kind each one is.

A stack is a regular expression over module names whose one group is the layer number, with its
role (``decoder``: causal text self-attention; ``encoder``: bidirectional text or audio
self-attention; ``cross``: decoder tokens attending to encoder positions; ``vision``: a vision
tower) and causality. Sliding windows, softcap, scaling and learned sinks (gpt-oss: ``s_aux``)
come with each attention call; positions follow the KV cache (``attnscope.probes.session``).
Families not in the table fall back to the module's ``is_causal`` attribute and cross-attention
module names. A new family = an entry here and a parity test of its captured statistics against
eager attentions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["decoder", "encoder", "cross", "vision"]
CROSS_NAMES = ("encoder_attn", "crossattention", "cross_attn")
_LAYER_NUMBER = re.compile(r"\.(\d+)(?=\.|$)")


@dataclass(frozen=True)
class Stack:
    pattern: str  # full match on the module name; group 1 is the layer index
    role: Role
    causal: bool


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]  # config.model_type values
    stacks: tuple[Stack, ...]


_DECODER = Stack(r"(?:model\.)?(?:language_model\.)?layers\.(\d+)\.self_attn", "decoder", True)
_ENCODER_TOWER = Stack(  # CLIP / SigLIP vision towers of LLaVA and Gemma 3
    r"(?:model\.)?vision_tower\.(?:vision_model\.)?encoder\.layers\.(\d+)\.self_attn",
    "vision",
    False,
)
FAMILIES: tuple[Family, ...] = (
    Family(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt_oss"),
        (_DECODER,),
    ),
    Family(("gemma3", "llava"), (_DECODER, _ENCODER_TOWER)),
    Family(("gpt2",), (Stack(r"(?:transformer\.)?h\.(\d+)\.attn", "decoder", True),)),
    Family(
        ("bert",),
        (Stack(r"(?:bert\.)?encoder\.layer\.(\d+)\.attention\.self", "encoder", False),),
    ),
    Family(
        ("whisper",),
        (
            Stack(r"(?:model\.)?encoder\.layers\.(\d+)\.self_attn", "encoder", False),
            Stack(r"(?:model\.)?decoder\.layers\.(\d+)\.self_attn", "decoder", True),
            Stack(r"(?:model\.)?decoder\.layers\.(\d+)\.encoder_attn", "cross", False),
        ),
    ),
    Family(
        ("qwen2_vl", "qwen2_5_vl"),
        (_DECODER, Stack(r"(?:model\.)?visual\.blocks\.(\d+)\.attn", "vision", False)),
    ),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


@dataclass(frozen=True)
class Site:
    """One attention module of a model: its stack template, layer, role and causality."""

    name: str  # module name, e.g. model.layers.3.self_attn
    stack: str  # template, e.g. model.layers.{}.self_attn
    layer: int  # -1 when the name holds no layer number
    role: Role
    causal: bool

    @property
    def cross(self) -> bool:
        return self.role == "cross"


def family_of(model_type: str) -> Family | None:
    return _BY_TYPE.get(model_type)


def stack_of(module_name: str) -> tuple[str, int]:
    """``model.layers.3.self_attn`` -> (``model.layers.{}.self_attn``, 3). Layer -1 if unnumbered."""
    m = _LAYER_NUMBER.search(module_name)
    if m is None:
        return module_name, -1
    return module_name[: m.start()] + ".{}" + module_name[m.end() :], int(m.group(1))


def attention_site(model_type: str, name: str, module: Any) -> Site | None:
    """The site of module ``name``, or None if it is not an attention module of the model."""
    stack, layer = stack_of(name)
    family = family_of(model_type)
    if family is not None:
        for rule in family.stacks:
            if re.fullmatch(rule.pattern, name):
                return Site(name, stack, layer, rule.role, rule.causal)
    if not hasattr(module, "is_causal"):
        return None
    if any(c in name for c in CROSS_NAMES):
        return Site(name, stack, layer, "cross", False)
    causal = bool(module.is_causal)
    return Site(name, stack, layer, "decoder" if causal else "encoder", causal)
