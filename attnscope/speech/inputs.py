"""What a speech model sees: the log-mel window, its silence baseline, the decoder prefix, and the
frame geometry that maps encoder frames back to seconds."""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

import numpy as np
from torch import Tensor

from attnscope.errors import AttnscopeError
from attnscope.models.loaded import LoadedModel
from attnscope.speech.audio import SAMPLE_RATE


def require_speech(lm: LoadedModel) -> None:
    """Speech analyses need an encoder-decoder speech model with a feature extractor."""
    extractor = getattr(lm.processor, "feature_extractor", None)
    if lm.kind != "speech" or extractor is None:
        raise AttnscopeError(
            f"{lm.name!r} is a {lm.kind} model; speech analyses need a Whisper-family "
            "speech-to-text model, e.g. whisper-tiny-en (`attnscope models` lists the aliases)"
        )


@dataclass
class SpeechInput:
    """One padded window of audio as log-mel features, and where the audio ends inside it."""

    features: Tensor  # [1, n_mels, n_mel] log-mel of the whole window (Whisper: 80 x 3000, 30 s)
    baseline: Tensor  # [1, n_mels, n_mel] features of silence (the extractor's output for zeros)
    n_samples: int  # audio samples at 16 kHz
    n_frames: int  # encoder frames holding audio; later frames only see the window's padding
    mel_per_frame: int  # mel frames per encoder frame (Whisper: 2)
    frame_seconds: float  # seconds per encoder frame (Whisper: 0.02)

    @property
    def n_mel_audio(self) -> int:
        """Mel frames of the encoder frames that hold audio."""
        return self.n_frames * self.mel_per_frame

    @property
    def seconds(self) -> float:
        return self.n_samples / SAMPLE_RATE

    def frame_times(self) -> np.ndarray:
        """Start time in seconds of each audio encoder frame ``[n_frames]``."""
        return np.arange(self.n_frames) * self.frame_seconds


def prepare(lm: LoadedModel, audio: np.ndarray) -> SpeechInput:
    """Log-mel window of ``audio`` (mono, 16 kHz); refuses audio longer than the model's window."""
    require_speech(lm)
    extractor = lm.processor.feature_extractor
    window = extractor.n_samples / extractor.sampling_rate
    if len(audio) == 0:
        raise AttnscopeError("the audio is empty: there is nothing to analyse")
    if len(audio) > extractor.n_samples:
        raise AttnscopeError(
            f"the audio is {len(audio) / SAMPLE_RATE:.1f} s long, longer than {lm.name!r}'s "
            f"{window:.0f} s window; analyse it in pieces of at most {window:.0f} s "
            f"(load_audio(..., offset=, duration={window:.0f}); CLI: --offset S --duration {window:.0f})"
        )
    if extractor.sampling_rate != SAMPLE_RATE:
        raise AttnscopeError(f"{lm.name!r} expects {extractor.sampling_rate} Hz audio, not 16 kHz")

    def log_mel(samples: np.ndarray) -> Tensor:
        return extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features

    features = log_mel(audio)  # [1, n_mels, n_mel]
    mel_per_frame = features.shape[-1] // lm.model.config.max_source_positions
    n_frames = ceil(len(audio) / extractor.hop_length / mel_per_frame)
    return SpeechInput(
        features=features.to(lm.model.device, lm.model.dtype),
        baseline=log_mel(np.zeros(1, np.float32)).to(lm.model.device, lm.model.dtype),
        n_samples=len(audio),
        n_frames=n_frames,
        mel_per_frame=mel_per_frame,
        frame_seconds=extractor.hop_length * mel_per_frame / SAMPLE_RATE,
    )


def decoder_prefix(lm: LoadedModel, language: str = "en") -> list[int]:
    """Tokens the decoder starts from: <|startoftranscript|> [<|lang|> <|transcribe|>] <|notimestamps|>
    (language and task only for multilingual models)."""
    gen = lm.model.generation_config
    prefix = [gen.decoder_start_token_id]
    if getattr(gen, "is_multilingual", False):
        prefix += [gen.lang_to_id[f"<|{language}|>"], gen.task_to_id["transcribe"]]
    no_timestamps = getattr(gen, "no_timestamps_token_id", None)
    if no_timestamps is None:
        raise AttnscopeError(f"{lm.name!r}'s generation config has no <|notimestamps|> token")
    return [*prefix, no_timestamps]


def transcript_ids(lm: LoadedModel, transcript: str) -> list[int]:
    """Token ids of ``transcript`` as Whisper writes it (leading space, no special tokens)."""
    if not transcript.strip():
        raise AttnscopeError("the transcript is empty; pass text or let the model transcribe")
    return lm.tokenizer(" " + transcript.strip(), add_special_tokens=False).input_ids
