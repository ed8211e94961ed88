"""Speech analyses: audio loading and its errors, cross-attention capture against eager Whisper,
word timings against known word boundaries, and the `attnscope speech` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf
import torch
from reference import assert_trace_matches

import attnscope as asc
from attnscope import metrics
from attnscope.cli import main
from attnscope.errors import AttnscopeError, MissingDependencyError
from attnscope.models.loaded import LoadedModel
from attnscope.models.loader import load
from attnscope.speech import (
    SAMPLE_RATE,
    analyze_speech,
    capture_cross_attention,
    load_audio,
    prepare,
    word_timings,
)
from attnscope.speech import speak as synthesise
from attnscope.speech.audio import AudioWarning
from attnscope.speech.inputs import decoder_prefix, transcript_ids
from attnscope.speech.timing import dtw
from attnscope.store import RunStore

SENTENCE = "please open the window and let the fresh air come in"
GAP = 0.2  # seconds of silence around each separately spoken word


def speak(text: str, directory: Path) -> np.ndarray:
    """``attnscope.speech.speak``, skipping the test where espeak-ng is missing."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make system-deps)")
    return synthesise(text, directory)


@pytest.fixture(scope="module")
def whisper() -> LoadedModel:
    return load("whisper-tiny-en")


@pytest.fixture(scope="module")
def tiny_whisper() -> LoadedModel:
    return load("tiny-whisper")


# -- audio -------------------------------------------------------------------------------------
@torch.no_grad()
def test_encoder_decoder_capture_over_kv_cache_steps(tiny_whisper: LoadedModel) -> None:
    """Decoder traces are labelled by decoder_input_ids; cross-attention keeps the encoder keys
    once (not per step) and no columns (its keys are frames); everything equals eager."""
    model = tiny_whisper.model
    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[model.config.decoder_start_token_id, 11, 12, 13, 14, 15]])
    with asc.capture(model, keep_qk=True) as cap:
        out = model(input_features=features, decoder_input_ids=ids[:, :3], use_cache=True)
        encoded, past = (out.encoder_last_hidden_state,), out.past_key_values
        for t in range(3, ids.shape[1]):  # one decode step per token, reusing the encoder output
            out = model(encoder_outputs=encoded, decoder_input_ids=ids[:, t : t + 1],
                        past_key_values=past, use_cache=True)  # fmt: skip
            past = out.past_key_values
    model.set_attn_implementation("eager")
    try:
        eager = model(input_features=features, decoder_input_ids=ids, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    stacks = {s.split(".")[1] + "." + s.split(".")[-1]: s for s in cap.stacks()}
    decoder = cap.traces(stacks["decoder.self_attn"])[0]
    assert cap.default_stack() == stacks["decoder.self_attn"]
    assert decoder.token_ids == ids[0].tolist()
    assert_trace_matches(decoder, torch.stack(eager.decoder_attentions)[:, 0])

    cross = cap.traces(stacks["decoder.encoder_attn"])[0]
    assert cross.token_ids == ids[0].tolist() and cross.cols == {}
    expected = torch.stack(eager.cross_attentions)[:, 0]  # [L, H, 6, 1500]
    torch.testing.assert_close(
        cross.rows["entropy"], metrics.entropy(expected), atol=1e-4, rtol=1e-4
    )
    for i, layer in enumerate(cross.layers):
        q, k = cross.qk[layer]
        assert q.shape[:2] == (4, 6) and k.shape[:2] == (4, 1500)  # encoder keys kept once
        scale = cross.meta["qk_attention"][str(layer)]["scale"]
        rebuilt = torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1)
        torch.testing.assert_close(rebuilt, expected[i], atol=1e-5, rtol=0)

    encoder = cap.traces(stacks["encoder.self_attn"])[0]
    assert len(encoder) == 1500
    assert_trace_matches(encoder, torch.stack(eager.encoder_attentions)[:, 0])


def test_audio_is_mixed_to_mono_and_resampled_to_16_khz(tmp_path: Path) -> None:
    rate, seconds = 22_050, 0.5
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(tmp_path / "tone.flac", np.stack([tone, np.zeros_like(tone)], axis=1), rate)
    audio = load_audio(tmp_path / "tone.flac")
    assert audio.dtype == np.float32 and audio.shape == (SAMPLE_RATE // 2,)
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE)[spectrum.argmax()] == pytest.approx(440)
    assert np.abs(audio[1000:-1000]).max() == pytest.approx(0.25, abs=0.01)  # channels averaged
    with pytest.warns(AudioWarning, match=r"only 0\.20 s of audio read from .*tone\.flac"):
        window = load_audio(tmp_path / "tone.flac", offset=0.1, duration=0.2)
    assert window.shape == (round(0.2 * SAMPLE_RATE),)


def test_unreadable_or_empty_audio_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AttnscopeError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "noise.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(AttnscopeError, match=r"cannot read .*noise\.wav as audio"):
        load_audio(tmp_path / "noise.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    with pytest.raises(AttnscopeError, match="holds no audio samples"):
        load_audio(tmp_path / "empty.wav")
    sf.write(tmp_path / "short.wav", np.zeros(1600, np.float32), SAMPLE_RATE)
    with pytest.raises(AttnscopeError, match="holds no audio samples"):
        load_audio(tmp_path / "short.wav", offset=1.0)
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(np.zeros(10, np.float32))


def test_audio_longer_than_the_window_or_empty_is_refused(tiny_whisper: LoadedModel) -> None:
    with pytest.raises(AttnscopeError, match="the audio is empty"):
        prepare(tiny_whisper, np.zeros(0, np.float32))
    with pytest.raises(
        AttnscopeError, match=r"31\.0 s long, longer than .* 30 s window.*--duration"
    ):
        prepare(tiny_whisper, np.zeros(31 * SAMPLE_RATE, np.float32))


def test_a_text_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    audio = np.zeros(SAMPLE_RATE, np.float32)
    with pytest.raises(AttnscopeError, match="'tiny-gpt2' is a causal-lm model; speech analyses"):
        analyze_speech(load("tiny-gpt2"), audio)
    sf.write(tmp_path / "silence.wav", audio, SAMPLE_RATE)
    code = main(
        [
            "speech",
            str(tmp_path / "silence.wav"),
            "--model",
            "tiny-gpt2",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    assert "need a Whisper-family speech-to-text model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- word timings ------------------------------------------------------------------------------
def test_dtw_takes_the_cheapest_monotonic_path() -> None:
    cost = np.array([[0, 0, 5, 5], [5, 5, 0, 5], [5, 5, 5, 0]], dtype=float)
    rows, cols = dtw(cost)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (0, 1), (1, 2), (2, 3)]


def test_words_are_grouped_from_pieces_and_timed_by_their_frames() -> None:
    tokens = [" Op", "en", " the", " window", ".", "<|endoftext|>"]
    spans = [(0, 10), (10, 25), (25, 30), (30, 50), (50, 55), (55, 60)]  # frames per token
    maps = torch.zeros(1, len(tokens), 60)  # [heads, T, F]
    for i, (a, b) in enumerate(spans):
        maps[0, i, a:b] = 1.0
    words = word_timings(maps, tokens, 0.02, end_row=True)
    assert [(w.word, w.start, w.end) for w in words] == [
        ("Open", 0.0, pytest.approx(0.5)),
        ("the", pytest.approx(0.5), pytest.approx(0.6)),
        ("window", pytest.approx(0.6), pytest.approx(1.0)),
    ]


# -- the command on the random tiny Whisper (fast) ------------------------------------------------
def test_speech_command_writes_the_run_and_report(tmp_path: Path, capsys) -> None:
    sf.write(tmp_path / "clip.wav", 0.1 * np.random.default_rng(0).standard_normal(24_000), 24_000)
    out = tmp_path / "runs" / "clip"
    args = ["speech", str(tmp_path / "clip.wav"), "--model", "tiny-whisper", "--out", str(out)]
    options = ["--transcript", "open the", "--saliency", "gxi,occlusion", "--patch", "20,40"]
    assert main([*args, *options, "--batch-size", "8", "--deletion", "0,0.5", "--token", "3"]) == 0
    printed = capsys.readouterr().out
    assert "transcript (forced): open the" in printed and "all heads" in printed
    summary = json.loads((out / "speech.json").read_text())
    assert summary["transcript"] == "open the"
    assert summary["tokens"] == [" o", "p", "en", " the", "<|endoftext|>"]
    assert [w[0] for w in summary["words"]] == ["open", "the"]
    assert summary["meta"]["audio_frames"] == 50  # 1 s at 50 frames per second
    assert summary["meta"]["pooling"] == {
        "freq": "max",
        "time": "max",
        "factor": 2,
        "magnitude": True,
    }
    files = {p.name for p in out.iterdir()} | {p.name for p in (out / "figures").iterdir()}
    assert {"alignment.parquet", "deletion.parquet", "maps.safetensors", "report.html"} <= files
    assert {"token_3.json", "alignment.json", "deletion.json", "encoder_heads.json"} <= files
    report = (out / "report.html").read_text()
    assert "open the" in report and "Word timings" in report
    assert [r.name for r in RunStore(tmp_path / "runs").runs()] == ["clip"]
    assert main([*args, *options]) == 2  # the run exists and --overwrite was not given


# -- the real Whisper tiny.en -----------------------------------------------------------------------
@pytest.mark.slow
def test_captured_cross_attention_equals_eager(whisper: LoadedModel, tmp_path: Path) -> None:
    speech = prepare(whisper, speak("open the window", tmp_path))
    generated = capture_cross_attention(whisper, speech)
    forced = capture_cross_attention(whisper, speech, transcript_ids(whisper, "open the window"))
    transcript = whisper.tokenizer.decode(generated.token_ids, skip_special_tokens=True)
    assert jiwer.wer("open the window", transcript.lower().strip(" .")) == 0
    for cross in (generated, forced):
        assert cross.token_ids[-1] == whisper.model.generation_config.eos_token_id
        ids = torch.tensor([decoder_prefix(whisper) + cross.token_ids[:-1]])
        whisper.model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                out = whisper.model(speech.features, decoder_input_ids=ids, output_attentions=True)
        finally:
            whisper.model.set_attn_implementation("sdpa")
        eager = torch.stack(out.cross_attentions)[:, 0, :, 1:]  # [L, H, T, 1500] after <|sot|>
        assert cross.maps.shape == (4, 6, len(cross.token_ids), speech.n_frames)
        torch.testing.assert_close(cross.maps, eager[..., : speech.n_frames], atol=1e-4, rtol=0)
        audio_mass = eager[..., : speech.n_frames].sum(-1)
        torch.testing.assert_close(cross.audio_mass, audio_mass, atol=1e-4, rtol=0)
    assert forced.encoder.rows["entropy"].shape == (4, 6, 1500)
    assert forced.encoder.spans == {"audio": (0, speech.n_frames)}


@pytest.mark.slow
def test_word_timings_match_known_boundaries(whisper: LoadedModel, tmp_path: Path) -> None:
    silence = np.zeros(round(GAP * SAMPLE_RATE), np.float32)
    pieces, truth, t = [silence], [], GAP
    for word in SENTENCE.split():
        audio = speak(word, tmp_path)
        loud = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
        audio = audio[loud[0] : loud[-1] + 1]  # the word without espeak's own silence
        truth.append((word, t, t + len(audio) / SAMPLE_RATE))
        pieces += [audio, silence]
        t += len(audio) / SAMPLE_RATE + GAP
    analysis = analyze_speech(
        whisper, np.concatenate(pieces), SENTENCE, methods=(), deletion_fractions=()
    )
    words = analysis.words
    assert [w.word for w in words] == SENTENCE.split()
    errors = [abs(w.start - s) for w, (_, s, _) in zip(words, truth, strict=True)]
    errors += [abs(w.end - e) for w, (_, _, e) in zip(words, truth, strict=True)]
    print(f"boundary errors: median {np.median(errors):.3f} s, max {max(errors):.3f} s")
    assert np.median(errors) < 0.2


def test_speak_without_espeak_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("attnscope.speech.audio.shutil.which", lambda name: None)
    with pytest.raises(MissingDependencyError, match=r"espeak-ng is needed.*make system-deps"):
        synthesise("hello")
