"""``analyze_speech(lm, audio)``: transcript, cross-attention, saliency, their alignment, deletion
curves and word timings for one window of speech."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from attnscope.metrics.alignment import (
    Pooling,
    alignment_table,
    deletion_auc,
    deletion_masks,
    frame_importance,
    pool_saliency,
)
from attnscope.models.loaded import LoadedModel
from attnscope.saliency.forward import TeacherForced
from attnscope.saliency.speech import Saliency, SaliencyCost, method_name, speech_saliency
from attnscope.speech.audio import SILENT_DBFS, AudioWarning, rms_dbfs
from attnscope.speech.cross import CrossAttention, capture_cross_attention
from attnscope.speech.inputs import SpeechInput, decoder_prefix, prepare, transcript_ids
from attnscope.speech.timing import WordTiming, word_timings

# integrated gradients is opt-in: about n_steps x 1.5 times the cost of gradient x input
DEFAULT_METHODS = ("gradient_x_input", "occlusion")
DELETION_FRACTIONS = (0.0, 0.1, 0.3, 0.5)  # fraction 0 runs once, the others once per ranking
DEFAULT_COST = SaliencyCost()
DEFAULT_POOLING = Pooling()  # max over frequency, max over time
DELETION = pa.schema(
    [
        ("ranking", pa.string()),  # attention:all | attention:layerN | saliency:METHOD | random
        ("fraction", pa.float32()),  # of the audio frames silenced, most important first
        ("log_prob", pa.float32()),  # mean over the reference tokens
        ("auc", pa.float32()),  # mean log_prob over the curve (lower: evidence found sooner)
    ]
)


@dataclass
class SpeechAnalysis:
    """Everything measured on one window of speech; maps cover only the frames holding audio."""

    model: str
    transcript: str
    speech: SpeechInput
    cross: CrossAttention
    saliency: dict[str, Saliency]  # method -> relevance [T, n_mels, n_mel_audio]
    pooled: dict[str, Tensor]  # method -> relevance at the encoder frame rate [T, n_frames]
    alignment: pa.Table  # method, scope, layer, head, pearson, spearman, topk_overlap
    deletion: pa.Table  # ranking, fraction, log_prob (mean over the reference tokens)
    words: list[WordTiming]
    meta: dict = field(default_factory=dict)

    @property
    def tokens(self) -> list[str]:
        return self.cross.tokens

    def layer_pearson(self, method: str) -> dict[int, float]:
        """Pearson rho of each layer's head-mean map against ``method``'s saliency."""
        method = method_name(method)
        return {
            r["layer"]: r["pearson"]
            for r in self.alignment.to_pylist()
            if r["method"] == method and r["scope"] == "layer"
        }


def analyze_speech(
    lm: LoadedModel,
    audio: np.ndarray,
    transcript: str | None = None,
    *,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    cost: SaliencyCost = DEFAULT_COST,
    pooling: Pooling = DEFAULT_POOLING,
    top_k: int = 10,
    deletion_fractions: tuple[float, ...] = DELETION_FRACTIONS,
    timing_heads: list[tuple[int, int]] | None = None,
    language: str = "en",
    progress: bool = True,
) -> SpeechAnalysis:
    """Analyse mono 16 kHz ``audio`` (at most one window, 30 s for Whisper).

    With ``transcript`` the decoder is forced through it, else the model transcribes greedily.
    ``methods``: saliency methods (``ig``, ``gxi``, ``occlusion`` or full names; may be empty;
    default gradient x input and occlusion: integrated gradients is slow, see
    ``ig_seconds_per_token``); ``cost`` sets their price. ``deletion_fractions=()`` skips
    deletion curves.
    ``timing_heads`` ``[(layer, head)]`` for word timings: default the model's alignment heads
    (generation config), else the heads whose maps best match the first saliency method.
    Audio that looks silent gets an ``AudioWarning`` (also listed in ``meta["warnings"]``).
    """
    methods = tuple(method_name(m) for m in methods)  # unknown names fail before the slow part
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    speech = prepare(lm, audio)
    ids = None if transcript is None else transcript_ids(lm, transcript)
    cross = capture_cross_attention(lm, speech, ids, language=language)
    seconds["capture"] = time.perf_counter() - clock

    forced = TeacherForced(
        lm.model, speech.features, decoder_prefix(lm, language), cross.token_ids, speech.n_mel_audio
    )
    baseline = speech.baseline[..., : speech.n_mel_audio]
    pooling = replace(pooling, factor=speech.mel_per_frame)
    saliency = {
        s.method: s
        for s in (speech_saliency(forced, m, baseline, cost, progress=progress) for m in methods)
    }
    pooled = {
        m: pool_saliency(s.values, pooling)[:, : speech.n_frames] for m, s in saliency.items()
    }
    seconds.update({m: s.seconds for m, s in saliency.items()})
    table = alignment_table(cross.maps, pooled, cross.layers, k=top_k)

    clock = time.perf_counter()
    deletion = _deletion(forced, speech, baseline, cross, pooled, deletion_fractions, cost)
    seconds["deletion"] = time.perf_counter() - clock
    heads = timing_heads or _timing_heads(lm, table)
    words = word_timings(
        torch.stack([cross.maps[cross.layers.index(layer), head] for layer, head in heads]),
        cross.tokens,
        speech.frame_seconds,
        end_row=cross.token_ids[-1] == lm.model.generation_config.eos_token_id,
    )
    transcript = lm.tokenizer.decode(cross.token_ids, skip_special_tokens=True).strip()
    notes = _silence_warnings(audio, transcript)
    for note in notes:
        warnings.warn(note, AudioWarning, stacklevel=2)
    return SpeechAnalysis(
        model=lm.name,
        transcript=transcript,
        speech=speech,
        cross=cross,
        saliency=saliency,
        pooled=pooled,
        alignment=table,
        deletion=deletion,
        words=words,
        meta={
            "mode": cross.mode,
            "audio_seconds": speech.seconds,
            "audio_frames": speech.n_frames,
            "frames_in_window": cross.meta["frames_in_window"],
            "frames": "maps, saliency and metrics cover only the encoder frames that hold audio; "
            "the window's padded tail is excluded (cross-attention rows are not renormalised)",
            "pooling": pooling.as_dict(),
            "top_k": top_k,
            "topk_chance": min(top_k, speech.n_frames) / speech.n_frames,
            "cost": {
                "n_steps": cost.n_steps,
                "patch": list(cost.patch),
                "batch_size": cost.batch_size,
            },
            "timing_heads": [list(h) for h in heads],
            "seconds": seconds,
            "warnings": notes,
        },
    )


def _silence_warnings(audio: np.ndarray, transcript: str) -> list[str]:
    level = rms_dbfs(audio)
    if level >= SILENT_DBFS:
        return []
    loudness = "all zeros" if level == -np.inf else f"RMS {level:.0f} dBFS"
    return [
        f"the audio looks silent ({loudness}, below {SILENT_DBFS:.0f} dBFS): the transcript "
        f"{transcript!r} is likely a hallucination, not speech"
    ]


def ig_seconds_per_token(analysis: SpeechAnalysis, n_steps: int) -> float | None:
    """Estimated seconds of integrated gradients per token: ``n_steps`` forwards and backwards of
    one input, timed by gradient x input (its shared forward, its backward per token); None when
    gradient x input did not run."""
    gxi = analysis.saliency.get("gradient_x_input")
    if gxi is None:
        return None
    forward = gxi.params["forward_seconds"]
    return n_steps * (forward + (gxi.seconds - forward) / len(analysis.tokens))


def _deletion(
    forced: TeacherForced,
    speech: SpeechInput,
    baseline: Tensor,
    cross: CrossAttention,
    pooled: dict[str, Tensor],
    fractions: tuple[float, ...],
    cost: SaliencyCost,
) -> pa.Table:
    """Mean log-prob of the reference tokens as frames are replaced by silence, most important
    first, ranked by attention (all heads; each layer), by each saliency map, and at random."""
    rankings = {"attention:all": frame_importance(cross.maps.mean((0, 1)))}
    for i, layer in enumerate(cross.layers):
        rankings[f"attention:layer{layer}"] = frame_importance(cross.maps[i].mean(0))
    rankings.update({f"saliency:{m}": frame_importance(p) for m, p in pooled.items()})
    generator = torch.Generator().manual_seed(0)
    rankings["random"] = torch.rand(speech.n_frames, generator=generator)
    if not fractions:
        return DELETION.empty_table()
    masks = torch.cat([deletion_masks(r, fractions) for r in rankings.values()])  # [R * n, F]
    # each distinct mask runs once (fraction 0 is the same for every ranking)
    unique, index = torch.unique(masks, dim=0, return_inverse=True)  # [U, F], [R * n]
    mel = unique.repeat_interleave(speech.mel_per_frame, dim=-1)[:, None]  # [U, 1, n_mel]
    with torch.no_grad():
        scores = [
            forced.target_log_probs(torch.where(chunk, baseline, forced.audio)).mean(-1).cpu()
            for chunk in mel.to(baseline.device).split(cost.batch_size)
        ]
    curves = torch.cat(scores)[index].view(len(rankings), len(fractions)).numpy()
    rows = [
        (name, f, float(value), deletion_auc(fractions, curve))
        for name, curve in zip(rankings, curves, strict=True)
        for f, value in zip(fractions, curve, strict=True)
    ]
    return pa.Table.from_pylist([dict(zip(DELETION.names, r, strict=True)) for r in rows], DELETION)


def _timing_heads(lm: LoadedModel, table: pa.Table, n: int = 6) -> list[tuple[int, int]]:
    """The model's alignment heads, else the ``n`` heads with the highest Pearson rho."""
    heads = getattr(lm.model.generation_config, "alignment_heads", None)
    if heads:
        return [(int(layer), int(head)) for layer, head in heads]
    rows = [r for r in table.to_pylist() if r["scope"] == "head"]
    if not rows:  # no saliency: the decoder's second half
        n_layers = lm.model.config.decoder_layers
        n_heads = lm.model.config.decoder_attention_heads
        return [(layer, h) for layer in range(n_layers // 2, n_layers) for h in range(n_heads)]
    first = rows[0]["method"]
    ranked = sorted((r for r in rows if r["method"] == first), key=lambda r: -r["pearson"])
    return [(r["layer"], r["head"]) for r in ranked[:n]]
