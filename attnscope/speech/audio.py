"""Reading audio: any file soundfile reads, any sample rate and channel count -> mono 16 kHz."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from attnscope.errors import AttnscopeError, MissingDependencyError

SAMPLE_RATE = 16_000
WORDS_PER_MINUTE = 140


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
    select a window, e.g. one 30 s piece of a long recording. Channels are averaged.
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
        name = str(source)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.ndim != 1:
        raise AttnscopeError(f"{name}: expected samples [n] or [n, channels], got {audio.shape}")
    if audio.size == 0:
        raise AttnscopeError(f"{name} holds no audio samples (after offset {offset} s)")
    if not np.isfinite(audio).all():
        raise AttnscopeError(f"{name} holds NaN or infinite samples")
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
            f.seek(min(round(offset * rate), f.frames))
            frames = -1 if duration is None else round(duration * rate)
            return f.read(frames, dtype="float32", always_2d=True), rate
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AttnscopeError(
            f"cannot read {path} as audio ({err}); soundfile reads WAV, FLAC, OGG, MP3 and the "
            "other libsndfile formats"
        ) from err


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
