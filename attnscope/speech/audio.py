"""Reading audio: any file soundfile reads, any sample rate and channel count -> mono 16 kHz.

Audio that reads but looks wrong for speech gets an ``AudioWarning``: a file whose header promises
more than it holds (truncated), a clip shorter than ``MIN_SECONDS``; ``analyze_speech`` warns about
one quieter than ``SILENT_DBFS``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import warnings
import wave
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from attnscope.errors import AttnscopeError, MissingDependencyError

SAMPLE_RATE = 16_000
WORDS_PER_MINUTE = 140
MIN_SECONDS = 0.3  # shorter than a short spoken word
SILENT_DBFS = -60.0  # RMS level below which a clip holds no speech (speech: about -30 to -15)
STREAMED_BYTES = 2**30  # a WAV header declaring more data was written before its length was known


class AudioWarning(UserWarning):
    """Audio that reads, but is truncated, too short or silent: the analysis may mean little."""


def rms_dbfs(audio: np.ndarray) -> float:
    """RMS level of ``audio`` ``[n]`` in dB relative to full scale (-inf for all zeros)."""
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    return 20 * np.log10(rms) if rms > 0 else -np.inf


def load_audio(
    source: str | Path | np.ndarray,
    sample_rate: int | None = None,
    *,
    offset: float = 0.0,
    duration: float | None = None,
    target_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """Mono float32 samples ``[n]`` at ``target_rate`` from a file or an array.

    A file is read with soundfile (WAV, FLAC, OGG, MP3, ...) at its own rate; an array needs
    ``sample_rate`` and may be ``[n]`` or ``[n, channels]``. ``offset`` and ``duration`` (seconds)
    select a window, e.g. one 30 s piece of a long recording. Channels are averaged. A truncated
    file or a clip under ``MIN_SECONDS`` gets an ``AudioWarning`` naming what was read.
    """
    if offset < 0 or (duration is not None and duration <= 0):
        raise ValueError(f"offset must be >= 0 and duration > 0, got {offset} and {duration}")
    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise ValueError("an audio array needs its sample_rate")
        audio, rate, name = source, sample_rate, "the audio array"
        start = round(offset * rate)
        audio = audio[start : None if duration is None else start + round(duration * rate)]
    else:
        audio, rate = _read(Path(source), offset, duration)
        name = f"{source} ({Path(source).stat().st_size:,} bytes)"
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.ndim != 1:
        raise AttnscopeError(f"{name}: expected samples [n] or [n, channels], got {audio.shape}")
    if audio.size == 0:
        raise AttnscopeError(f"{name} holds no audio samples (after offset {offset} s)")
    if not np.isfinite(audio).all():
        raise AttnscopeError(f"{name} holds NaN or infinite samples")
    if len(audio) < MIN_SECONDS * rate:
        warnings.warn(
            f"only {len(audio) / rate:.2f} s of audio read from {name}: too short for speech; "
            "is the file truncated or the window (offset, duration) misplaced?",
            AudioWarning,
            stacklevel=2,
        )
    if rate != target_rate:
        g = gcd(int(rate), target_rate)
        audio = resample_poly(audio, target_rate // g, int(rate) // g).astype(np.float32)
    return audio


def _read(path: Path, offset: float, duration: float | None) -> tuple[np.ndarray, int]:
    if not path.is_file():
        raise AttnscopeError(f"audio file {path} does not exist")
    try:
        with sf.SoundFile(path) as f:
            rate = f.samplerate
            _warn_if_truncated(path, f.frames, rate)
            f.seek(min(round(offset * rate), f.frames))
            frames = -1 if duration is None else round(duration * rate)
            return f.read(frames, dtype="float32", always_2d=True), rate
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AttnscopeError(
            f"cannot read {path} as audio ({err}); soundfile reads WAV, FLAC, OGG, MP3 and the "
            "other libsndfile formats"
        ) from err


def _warn_if_truncated(path: Path, frames: int, rate: int) -> None:
    """Warn when a PCM WAV header declares more samples than the file holds."""
    try:
        with wave.open(str(path)) as w:
            declared, width = w.getnframes(), w.getsampwidth() * w.getnchannels()
    except (wave.Error, EOFError, OSError):
        return  # not a PCM WAV: libsndfile's frame count is all there is
    if frames < declared and declared * width < STREAMED_BYTES:
        warnings.warn(
            f"{path} ({path.stat().st_size:,} bytes) looks truncated: its header declares "
            f"{declared / rate:.2f} s of audio, the file holds {frames / rate:.2f} s; "
            "analysing what is there",
            AudioWarning,
            stacklevel=4,
        )


def speak(
    text: str, directory: str | Path | None = None, wpm: int = WORDS_PER_MINUTE
) -> np.ndarray:
    """``text`` spoken by espeak-ng at ``wpm`` words per minute: mono float32 samples ``[n]`` at
    16 kHz. The WAV file goes to ``directory`` (default: a temporary one, removed)."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise MissingDependencyError("espeak-ng is needed to synthesise speech (make system-deps)")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(directory or tmp) / f"{'_'.join(text.split())[:80]}.wav"
        cmd = [espeak, "-w", str(wav), "-s", str(wpm), text]
        subprocess.run(cmd, check=True, capture_output=True)
        return load_audio(wav)
