"""Defaults that finish in minutes: the speech command's saliency set (integrated gradients opt-in,
said when skipped), batched saliency equal to Captum's, warnings for truncated, short and silent
audio, and the rl-demo's size and progress bars."""

from __future__ import annotations

import inspect
import json
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from captum.attr import InputXGradient, IntegratedGradients

from attnscope.cli import build_parser, main
from attnscope.models.loaded import LoadedModel
from attnscope.models.loader import load
from attnscope.rl.demo import run_demo
from attnscope.saliency import SaliencyCost, TeacherForced, speech_saliency
from attnscope.saliency.speech import IG_RULE
from attnscope.speech import SAMPLE_RATE, analyze_speech, load_audio, prepare
from attnscope.speech.analysis import DELETION_FRACTIONS
from attnscope.speech.audio import AudioWarning
from attnscope.speech.inputs import decoder_prefix, transcript_ids


@pytest.fixture(scope="module")
def tiny_whisper() -> LoadedModel:
    return load("tiny-whisper")


@pytest.fixture(scope="module")
def forced(tiny_whisper: LoadedModel) -> tuple[TeacherForced, torch.Tensor]:
    """Tiny Whisper forced through 'open the' on 0.5 s of noise, and the silence baseline."""
    noise = 0.1 * np.random.default_rng(0).standard_normal(SAMPLE_RATE // 2).astype(np.float32)
    speech = prepare(tiny_whisper, noise)
    targets = transcript_ids(tiny_whisper, "open the")
    model = TeacherForced(
        tiny_whisper.model,
        speech.features,
        decoder_prefix(tiny_whisper),
        targets,
        speech.n_mel_audio,
    )
    return model, speech.baseline[..., : speech.n_mel_audio]


def tone(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


# -- speech: the default saliency set -----------------------------------------------------------
def test_speech_defaults_skip_integrated_gradients_and_say_so(tmp_path: Path, capsys) -> None:
    sf.write(tmp_path / "clip.wav", tone(0.5), SAMPLE_RATE)
    out = tmp_path / "run"
    args = ["speech", str(tmp_path / "clip.wav"), "--model", "tiny-whisper", "--out", str(out)]
    assert main([*args, "--transcript", "open the", "--deletion", ""]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "speech.json").read_text())
    assert set(summary["saliency"]) == {"gradient_x_input", "occlusion"}
    assert summary["meta"]["cost"]["patch"] == [20, 80]
    about = r"(~\d+ s|~\d+ min|under 1 s)"
    assert re.search(
        rf"^integrated gradients skipped \(slow: {about} per token, {about} for this clip's 5\); "
        r"add --saliency gxi,occlusion,ig to compute it$",
        printed,
        re.MULTILINE,
    ), printed
    defaults = build_parser().parse_args(["speech", "a.wav", "--out", "r"])
    assert "ig" not in defaults.saliency.split(",")
    assert tuple(map(float, defaults.deletion.split(","))) == DELETION_FRACTIONS
    assert (defaults.steps, tuple(map(int, defaults.patch.split(","))), defaults.batch_size) == (
        SaliencyCost().n_steps,
        SaliencyCost().patch,
        SaliencyCost().batch_size,
    )


def test_asking_for_ig_computes_it_and_skips_nothing(tmp_path: Path, capsys) -> None:
    sf.write(tmp_path / "clip.wav", tone(0.4), SAMPLE_RATE)
    out = tmp_path / "run"
    args = ["speech", str(tmp_path / "clip.wav"), "--model", "tiny-whisper", "--out", str(out)]
    options = ["--transcript", "open", "--saliency", "ig", "--steps", "2", "--deletion", ""]
    assert main([*args, *options]) == 0
    assert "skipped" not in capsys.readouterr().out
    summary = json.loads((out / "speech.json").read_text())
    assert list(summary["saliency"]) == ["integrated_gradients"]
    assert summary["saliency"]["integrated_gradients"]["params"]["n_steps"] == 2


# -- speech: batched saliency equals Captum's ---------------------------------------------------
def test_gradient_x_input_from_one_forward_equals_captum(forced) -> None:
    model, baseline = forced
    ours = speech_saliency(model, "gxi", baseline, SaliencyCost(batch_size=2), progress=False)
    n = len(model.targets)
    audio = model.audio.expand(n, -1, -1).clone().requires_grad_()  # one input per token
    captum = InputXGradient(model.target_log_probs).attribute(audio, target=list(range(n)))
    assert ours.values.shape == (n, *model.audio.shape[1:])
    assert captum.abs().max() > 0
    torch.testing.assert_close(ours.values, captum.detach(), atol=1e-6, rtol=1e-4)


def test_integrated_gradients_batched_over_steps_equals_unbatched(forced) -> None:
    model, baseline = forced
    n = len(model.targets)
    audio = model.audio.expand(n, -1, -1)
    unbatched, delta = IntegratedGradients(model.target_log_probs).attribute(
        audio,
        baselines=baseline.expand_as(audio),
        target=list(range(n)),
        n_steps=6,
        method=IG_RULE,
        return_convergence_delta=True,
    )  # every token and point in one pass
    batched = speech_saliency(
        model, "ig", baseline, SaliencyCost(n_steps=6, batch_size=4), progress=False
    )  # a token per call, its 6 points in passes of 4
    assert batched.params["n_steps"] == 6
    torch.testing.assert_close(batched.values, unbatched.detach(), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(batched.convergence_delta, delta.detach(), atol=1e-5, rtol=1e-4)


def test_deletion_runs_each_distinct_mask_once(
    tiny_whisper: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows: list[int] = []
    original = TeacherForced.target_log_probs

    def counted(self: TeacherForced, audio: torch.Tensor) -> torch.Tensor:
        rows.append(audio.shape[0])
        return original(self, audio)

    monkeypatch.setattr(TeacherForced, "target_log_probs", counted)
    fractions = (0.0, 0.2, 0.5)
    analysis = analyze_speech(
        tiny_whisper, tone(0.5), "open the", methods=(), deletion_fractions=fractions
    )
    table = analysis.deletion.to_pylist()
    rankings = {r["ranking"] for r in table}
    assert len(table) == len(rankings) * len(fractions)
    # fraction 0 (nothing silenced) is shared by every ranking: one input, not one per ranking
    assert sum(rows) <= 1 + len(rankings) * (len(fractions) - 1)
    full = {r["log_prob"] for r in table if r["fraction"] == 0.0}
    assert len(full) == 1
    with torch.no_grad():
        speech = analysis.speech
        forced_model = TeacherForced(
            tiny_whisper.model,
            speech.features,
            decoder_prefix(tiny_whisper),
            analysis.cross.token_ids,
            speech.n_mel_audio,
        )
        expected = original(forced_model, forced_model.audio).mean().item()
    assert full.pop() == pytest.approx(expected, abs=1e-5)


# -- audio that reads but looks wrong ------------------------------------------------------------
def test_a_truncated_wav_is_read_with_a_warning_naming_duration_and_size(tmp_path: Path) -> None:
    sf.write(tmp_path / "full.wav", tone(1.0), SAMPLE_RATE, subtype="PCM_16")
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:2000])  # header + 978 samples
    with pytest.warns(AudioWarning) as caught:
        audio = load_audio(tmp_path / "cut.wav")
    assert audio.shape == ((2000 - 44) // 2,)
    said = [str(w.message) for w in caught]
    assert any(
        "cut.wav (2,000 bytes) looks truncated: its header declares 1.00 s of audio, the file "
        "holds 0.06 s" in s
        for s in said
    ), said
    assert any("only 0.06 s of audio read from" in s and "(2,000 bytes)" in s for s in said), said


def test_complete_or_streamed_wavs_read_without_warning(tmp_path: Path) -> None:
    sf.write(tmp_path / "full.wav", tone(1.0), SAMPLE_RATE, subtype="PCM_16")
    data = bytearray((tmp_path / "full.wav").read_bytes())
    assert data[36:40] == b"data"
    data[4:8] = struct.pack("<I", 0x7FFFF024)  # what a writer to a pipe leaves: unknown length
    data[40:44] = struct.pack("<I", 0x7FFFF000)
    (tmp_path / "streamed.wav").write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error", AudioWarning)
        assert load_audio(tmp_path / "full.wav").shape == (SAMPLE_RATE,)
        assert load_audio(tmp_path / "streamed.wav").shape == (SAMPLE_RATE,)


def test_a_short_window_warns(tmp_path: Path) -> None:
    sf.write(tmp_path / "clip.flac", tone(1.0), SAMPLE_RATE)
    with pytest.warns(AudioWarning, match=r"only 0\.10 s of audio read from .*clip\.flac"):
        load_audio(tmp_path / "clip.flac", offset=0.9)
    with pytest.warns(AudioWarning, match=r"only 0\.05 s of audio read from the audio array"):
        load_audio(tone(0.05), SAMPLE_RATE)


def test_silent_audio_warns_that_the_transcript_is_likely_a_hallucination(
    tiny_whisper: LoadedModel, tmp_path: Path, capsys
) -> None:
    with pytest.warns(AudioWarning, match=r"looks silent \(all zeros.*likely a hallucination"):
        analysis = analyze_speech(
            tiny_whisper, np.zeros(SAMPLE_RATE, np.float32), methods=(), deletion_fractions=()
        )
    assert (
        len(analysis.meta["warnings"]) == 1 and analysis.transcript in analysis.meta["warnings"][0]
    )
    hum = 1e-4 * tone(1.0) / 0.3  # -83 dBFS: a quiet line, no speech
    with pytest.warns(AudioWarning, match=r"looks silent \(RMS -83 dBFS, below -60 dBFS\)"):
        analyze_speech(tiny_whisper, hum, methods=(), deletion_fractions=())
    with warnings.catch_warnings():
        warnings.simplefilter("error", AudioWarning)
        spoken = analyze_speech(tiny_whisper, tone(1.0), methods=(), deletion_fractions=())
    assert spoken.meta["warnings"] == []

    sf.write(tmp_path / "silence.wav", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    args = ["speech", str(tmp_path / "silence.wav"), "--model", "tiny-whisper"]
    assert main([*args, "--out", str(tmp_path / "run"), "--saliency", "", "--deletion", ""]) == 0
    err = capsys.readouterr().err
    assert "attnscope: warning: the audio looks silent (all zeros" in err
    assert "UserWarning" not in err and "warnings.warn" not in err


# -- rl-demo ------------------------------------------------------------------------------------
def test_rl_demo_default_is_small_and_its_bars_show_arm_and_total(tmp_path: Path, capsys) -> None:
    default = inspect.signature(run_demo).parameters["steps"].default
    assert build_parser().parse_args(["rl-demo"]).steps == default
    assert default <= 40  # about 1 s per step and arm on 2 CPU cores: under 2 minutes in all
    result = run_demo(tmp_path, steps=3, warmup_steps=1, prompts_per_step=2, progress=True)
    assert [len(logs) for logs in result.history.values()] == [3, 3]
    bars = capsys.readouterr().err.replace("\r", "\n")
    assert "GRPO coupled: 100%" in bars and "GRPO plain: 100%" in bars
    assert "3/3 [" in bars and "0/3 [" in bars


def test_single_runs_keep_every_layers_queries_and_keys_within_the_budget() -> None:
    from transformers import Gemma3TextConfig

    from attnscope.analyze import QK_BUDGET, analyze, qk_within_budget

    lm = load("tiny-llama")
    n_layers = lm.model.config.num_hidden_layers
    kept = analyze(lm, "the cat sat on the mat")
    assert sorted(kept.qk) == list(range(n_layers)) and "qk_note" not in kept.meta
    asked = analyze(lm, "the cat sat on the mat", keep_qk=[1])
    assert sorted(asked.qk) == [1]
    assert not analyze(lm, "the cat sat", keep_qk=False).qk
    # Gemma-3-270M: 18 layers x (4 query + 1 KV heads) x 256 dims x 2 bytes per token
    gemma = Gemma3TextConfig(
        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256
    )
    per_token = 18 * 5 * 256 * 2
    fits = QK_BUDGET // per_token
    assert qk_within_budget(gemma, fits, None) == (True, "")
    keep, note = qk_within_budget(gemma, fits + 1, None)
    assert keep is False and "64 MB" in note and "--keep-qk" in note
    assert qk_within_budget(gemma, fits + 1, (0, 5))[0] is True  # two layers fit
