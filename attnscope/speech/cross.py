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
from attnscope.probes.capture import Capture
from attnscope.speech.inputs import SpeechInput, decoder_prefix
from attnscope.trace import Trace

AUDIO_SPAN = "audio"
# per-token statistics of cross-attention rows that mean something over encoder frames
TOKEN_METRICS = ("entropy", "max_attention", f"span_mass:{AUDIO_SPAN}")
# what the probe computes: the token metrics, and the head maps of the encoder (report.head_maps)
CAPTURED_METRICS = (*TOKEN_METRICS, "mean_distance", "sink_score")


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
    # cross-attention maps are small (tokens x encoder frames): rebuilt exactly from kept q/k
    cap = Capture(
        model, metrics=CAPTURED_METRICS, spans={AUDIO_SPAN: (0, speech.n_frames)}, keep_qk=True
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
    cross = cap.traces(_cross_stack(cap))[0]
    maps = _cross_maps(cross)  # [L, H, rows, Tk]
    first = len(prefix) - 1  # the row of the last prefix token predicts the first output token
    targets = [*token_ids, eot][: maps.shape[2] - first]  # + <|endoftext|> when its row exists
    rows = slice(first, first + len(targets))
    return CrossAttention(
        maps=maps[:, :, rows, : speech.n_frames].contiguous(),
        token_ids=targets,
        tokens=[lm.tokenizer.decode([t]) for t in targets],
        layers=cross.layers,
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
        encoder=_encoder_trace(cap),
        meta={"prefix": prefix, "frames_in_window": maps.shape[-1]},
    )


def _cross_maps(cross: Trace) -> Tensor:
    """``softmax(q k^T * scale)`` of every cross-attention layer and head from the trace's kept
    queries ``[H, Tq, D]`` and encoder keys ``[Hkv, Tk, D]``, rebuilt by the tile kernel.
    -> ``[L, H, Tq, Tk]``."""
    maps = []
    for layer in cross.layers:
        q, k, attention = cross.layer_qk(layer)
        scale = attention["scale"]
        span = (0, q.shape[1]), (0, k.shape[1])
        maps.append(
            torch.stack(
                [attention_tile(q, k, h, *span, scale=scale, causal=False) for h in range(len(q))]
            )
        )
    return torch.stack(maps)


def _encoder_trace(cap: Capture) -> Trace:
    """Statistics of the encoder's self-attention (the non-causal, non-cross stack)."""
    stacks = cap.stacks("encoder")
    if not stacks:
        raise AttnscopeError("no encoder self-attention call was captured")
    return cap.traces(stacks[0])[0]


def _cross_stack(cap: Capture) -> str:
    stacks = cap.stacks("cross")
    if not stacks:
        raise AttnscopeError(
            "no cross-attention call was captured: is this an encoder-decoder model?"
        )
    return stacks[0]
