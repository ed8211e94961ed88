"""Cross-attention maps (output token x encoder frame) and encoder statistics, captured by the
attention probe while the decoder is forced through a transcript or runs ``generate()``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from attnscope.errors import AttnscopeError
from attnscope.kernels.tiles import attention_tile
from attnscope.models.loaded import LoadedModel
from attnscope.probes.capture import CROSS_NAMES, Capture, stats_scale
from attnscope.probes.records import stack_of
from attnscope.speech.inputs import SpeechInput, decoder_prefix
from attnscope.trace import Trace

AUDIO_SPAN = "audio"
# per-token statistics of cross-attention rows that mean something over encoder frames
TOKEN_METRICS = ("entropy", "max_attention", f"span_mass:{AUDIO_SPAN}")
# what the probe computes: the token metrics, and the head maps of the encoder (report.head_maps)
CAPTURED_METRICS = (*TOKEN_METRICS, "mean_distance", "sink_score")


class CrossAttentionCapture(Capture):
    """``Capture`` that also keeps the probabilities of every cross-attention call.

    Cross-attention maps are small (decoder tokens x encoder frames), so they are kept whole:
    ``maps[layer]`` is a list of ``[B, H, Tq, Tk]`` chunks, one per call, in decoding order.
    """

    def __init__(self, model: torch.nn.Module, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.maps: dict[int, list[Tensor]] = {}

    @torch.no_grad()
    def _observe(self, module, query: Tensor, key: Tensor, mask, kwargs: dict) -> None:
        super()._observe(module, query, key, mask, kwargs)
        name = self._names.get(module)
        if name is None or not any(c in name for c in CROSS_NAMES):
            return
        layer = stack_of(name)[1]
        if self.layers is not None and layer not in self.layers:
            return
        if mask is not None:
            raise AttnscopeError(
                f"{name}: masked cross-attention (padded encoder keys) is not supported"
            )
        scale = stats_scale(query, module, kwargs.get("scaling"))
        self.maps.setdefault(layer, []).append(_probabilities(query, key, scale))

    def cross_maps(self) -> tuple[list[int], Tensor]:
        """Layers and their maps ``[L, B, H, rows, Tk]``, rows in decoding order."""
        if not self.maps:
            raise AttnscopeError(
                "no cross-attention call was captured: is this an encoder-decoder model?"
            )
        layers = sorted(self.maps)
        return layers, torch.stack([torch.cat(self.maps[i], dim=2) for i in layers])

    def encoder_trace(self) -> Trace:
        """Statistics of the encoder's self-attention (the non-causal, non-cross stack)."""
        stacks = [
            stack_of(n)[0]
            for n, r in self.records.items()
            if not r.causal and not any(c in n for c in CROSS_NAMES)
        ]
        if not stacks:
            raise AttnscopeError("no encoder self-attention call was captured")
        return self.traces(stacks[0])[0]


@dataclass
class CrossAttention:
    """Cross-attention of each output token on the encoder frames that hold audio.

    Row ``t`` is the attention of the decoder query that predicts ``token_ids[t]``; the last output
    token is <|endoftext|> when decoding reached it. Maps are the model's probabilities restricted
    to the audio frames (not renormalised): ``audio_mass`` says how much of each row that keeps.
    """

    maps: Tensor  # [L, H, T, n_frames]
    token_ids: list[int]
    tokens: list[str]
    layers: list[int]
    mode: Literal["forced", "generate"]
    trace: Trace  # per token: entropy, max_attention over all frames, span_mass:audio
    encoder: Trace  # encoder self-attention statistics over all frames (span `audio`)
    meta: dict = field(default_factory=dict)

    @property
    def audio_mass(self) -> Tensor:
        """Share of each row's attention on audio frames rather than the window's padding ``[L, H, T]``."""
        return self.trace.rows[f"span_mass:{AUDIO_SPAN}"]


@torch.no_grad()
def capture_cross_attention(
    lm: LoadedModel,
    speech: SpeechInput,
    token_ids: list[int] | None = None,
    *,
    language: str = "en",
) -> CrossAttention:
    """Decode ``speech`` with the probe on: forced through ``token_ids`` (transcript tokens, no
    specials), or greedily with ``generate()`` when ``token_ids`` is None."""
    model = lm.model
    prefix = decoder_prefix(lm, language)
    eot = model.generation_config.eos_token_id
    mode = "generate" if token_ids is None else "forced"
    cap = CrossAttentionCapture(
        model, metrics=CAPTURED_METRICS, spans={AUDIO_SPAN: (0, speech.n_frames)}
    )
    with cap:
        if token_ids is None:
            kwargs = {"language": language} if model.generation_config.is_multilingual else {}
            out = model.generate(
                speech.features, **kwargs
            )  # up to the generation config's max_length
            token_ids = [t for t in out[0].tolist() if t not in (*prefix, eot)]
        else:
            ids = torch.tensor([prefix + token_ids], device=model.device)
            model(input_features=speech.features, decoder_input_ids=ids)
    layers, maps = cap.cross_maps()  # [L, 1, H, rows, Tk]
    first = len(prefix) - 1  # the row of the last prefix token predicts the first output token
    targets = [*token_ids, eot][: maps.shape[3] - first]  # + <|endoftext|> when its row exists
    rows = slice(first, first + len(targets))
    cross = cap.traces(_cross_stack(cap))[0]
    return CrossAttention(
        maps=maps[:, 0, :, rows, : speech.n_frames].contiguous(),
        token_ids=targets,
        tokens=[lm.tokenizer.decode([t]) for t in targets],
        layers=layers,
        mode=mode,
        trace=Trace(
            tokens=[lm.tokenizer.decode([t]) for t in targets],
            token_ids=targets,
            spans={},
            layers=cross.layers,
            n_heads=cross.n_heads,
            rows={name: cross.rows[name][..., rows] for name in TOKEN_METRICS},
            cols={},
            meta={**cross.meta, "model": lm.name, "kind": lm.kind, "audio_frames": speech.n_frames},
        ),
        encoder=cap.encoder_trace(),
        meta={"prefix": prefix, "frames_in_window": maps.shape[-1]},
    )


def _probabilities(query: Tensor, key: Tensor, scale: float) -> Tensor:
    """``softmax(q k^T * scale)`` of every sequence and head, rebuilt exactly by the tile kernel.
    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]`` -> ``[B, Hq, Tq, Tk]`` on the CPU."""
    tq, tk = query.shape[2], key.shape[2]
    return torch.stack(
        [
            torch.stack(
                [
                    attention_tile(q, k, h, (0, tq), (0, tk), scale=scale, causal=False)
                    for h in range(len(q))
                ]
            )
            for q, k in zip(query.detach(), key.detach(), strict=True)
        ]
    ).cpu()


def _cross_stack(cap: Capture) -> str:
    return next(s for s in cap.stacks() if any(c in s for c in CROSS_NAMES))
