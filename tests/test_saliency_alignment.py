"""Attention-vs-saliency metrics on hand-made maps, and Captum saliency on the real Whisper tiny.en."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_speech import speak

from attnscope.metrics.alignment import (
    Pooling,
    alignment_table,
    deletion_auc,
    deletion_masks,
    frame_importance,
    pearson,
    pool_saliency,
    spearman,
    topk_overlap,
)
from attnscope.models.loaded import LoadedModel
from attnscope.models.loader import load
from attnscope.saliency import SaliencyCost, TeacherForced, speech_saliency
from attnscope.speech import SpeechInput, analyze_speech, prepare
from attnscope.speech.inputs import decoder_prefix, transcript_ids

TEXT = "Open the window."


def test_pooling_reduces_frequency_then_time_to_the_frame_rate() -> None:
    values = torch.tensor([[[1.0, -5.0, 2.0, 0.0, 3.0], [0.0, 1.0, -4.0, 6.0, 1.0]]])  # [1, 2, 5]
    torch.testing.assert_close(pool_saliency(values), torch.tensor([[5.0, 6.0, 3.0]]))
    mean = pool_saliency(values, Pooling(freq="mean", time="mean", magnitude=False))
    torch.testing.assert_close(mean, torch.tensor([[-0.75, 1.0, 2.0]]))
    assert Pooling().as_dict() == {"freq": "max", "time": "max", "factor": 2, "magnitude": True}


def test_pearson_is_the_correlation_of_the_flattened_maps() -> None:
    a, b = torch.rand(3, 4, 5, 20), torch.rand(5, 20)  # [L, H, T, F] against [T, F]
    rho = pearson(a, b)
    assert rho.shape == (3, 4)
    expected = np.corrcoef(a[1, 2].flatten().numpy(), b.flatten().numpy())[0, 1]
    assert rho[1, 2].item() == pytest.approx(expected, abs=1e-6)
    assert pearson(3 * b + 1, b).item() == pytest.approx(1.0, abs=1e-6)  # standardised per map
    assert pearson(-b, b).item() == pytest.approx(-1.0, abs=1e-6)


def test_spearman_ranks_each_token_row_with_average_ties() -> None:
    a = torch.tensor([[1.0, 1.0, 2.0, 5.0, 0.0], [3.0, 2.0, 1.0, 0.0, 4.0]])
    b = torch.tensor([[0.0, 2.0, 2.0, 9.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    got = spearman(a, b)
    expected = [spearmanr(x, y).statistic for x, y in zip(a.numpy(), b.numpy(), strict=True)]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def test_topk_overlap_counts_shared_frames() -> None:
    a = torch.tensor([[9.0, 8.0, 7.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 8.0, 9.0, 7.0, 0.0, 0.0]])
    assert topk_overlap(a, b, k=3).tolist() == pytest.approx([2 / 3])
    assert topk_overlap(a, a, k=2).tolist() == [1.0]


def test_table_has_every_head_each_layer_and_all_heads() -> None:
    saliency = torch.rand(6, 30)  # [T, F]
    maps = torch.rand(2, 3, 6, 30)
    maps[1, 2] = saliency * 0.1  # a head that attends exactly where the saliency is
    table = alignment_table(maps, {"ig": saliency, "occlusion": torch.rand(6, 30)}, [4, 7], k=5)
    assert table.num_rows == 2 * (2 * 3 + 2 + 1)
    rows = table.to_pylist()
    planted = next(r for r in rows if (r["method"], r["layer"], r["head"]) == ("ig", 7, 2))
    assert planted["scope"] == "head"
    assert planted["pearson"] == pytest.approx(1.0, abs=1e-5)
    assert planted["spearman"] == pytest.approx(1.0, abs=1e-5)
    assert planted["topk_overlap"] == 1.0
    layer7 = next(r for r in rows if (r["method"], r["scope"], r["layer"]) == ("ig", "layer", 7))
    assert layer7["pearson"] == pytest.approx(pearson(maps[1].mean(0), saliency).item(), abs=1e-6)
    assert [r["scope"] for r in rows].count("all") == 2
    assert all(np.isfinite(r["pearson"]) for r in rows)


def test_deletion_removes_the_most_important_frames_first() -> None:
    importance = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.0])
    masks = deletion_masks(importance, (0.0, 0.2, 0.4, 1.0))
    assert masks.tolist() == [
        [False] * 5,
        [False, True, False, False, False],
        [False, True, False, True, False],
        [True] * 5,
    ]
    assert deletion_auc((0.0, 0.5, 1.0), np.array([0.0, -1.0, -2.0])) == pytest.approx(-1.0)


def test_frame_importance_weighs_every_token_equally() -> None:
    m = torch.tensor([[1.0, 1.0, 0.0], [0.0, 100.0, 300.0]])
    torch.testing.assert_close(frame_importance(m), torch.tensor([0.5, 0.75, 0.75]))


# -- Captum saliency on the real Whisper tiny.en --------------------------------------------------
@pytest.fixture(scope="module")
def whisper() -> LoadedModel:
    return load("whisper-tiny-en")


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return speak(TEXT.lower().strip("."), tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="module")
def speech(whisper: LoadedModel, audio: np.ndarray) -> SpeechInput:
    return prepare(whisper, audio)


def _forced(whisper: LoadedModel, speech: SpeechInput, n_targets: int) -> TeacherForced:
    targets = [*transcript_ids(whisper, TEXT), whisper.model.generation_config.eos_token_id]
    prefix = decoder_prefix(whisper)
    return TeacherForced(
        whisper.model, speech.features, prefix, targets[:n_targets], speech.n_mel_audio
    )


@pytest.mark.slow
def test_integrated_gradients_pass_the_completeness_check(
    whisper: LoadedModel, speech: SpeechInput
) -> None:
    forced = _forced(whisper, speech, 1)  # " Open": the path from silence has a sharp onset
    baseline = speech.baseline[..., : speech.n_mel_audio]
    ig = speech_saliency(forced, "ig", baseline, SaliencyCost(n_steps=32, batch_size=8))
    with torch.no_grad():
        change = forced.target_log_probs(forced.audio) - forced.target_log_probs(baseline)  # [1, 1]
    print(f"log p change {change.item():.3f}, convergence delta {ig.convergence_delta.item():.4f}")
    assert change.abs().item() > 1  # the audio, not the prefix, makes the token likely
    total = ig.values.sum().item()  # Captum's delta: sum of attributions - change of the output
    assert ig.convergence_delta.item() == pytest.approx(total - change.item(), abs=1e-3)
    assert abs(ig.convergence_delta.item()) < 0.1 * abs(change.item())
    assert ig.completeness_error.item() == pytest.approx(
        abs(ig.convergence_delta.item() / change.item()), rel=1e-3
    )


@pytest.mark.slow
def test_occlusion_scores_each_patch_by_the_kl_divergence(
    whisper: LoadedModel, speech: SpeechInput
) -> None:
    forced = _forced(whisper, speech, 5)
    baseline = speech.baseline[..., : speech.n_mel_audio]
    occlusion = speech_saliency(forced, "occlusion", baseline, SaliencyCost(patch=(40, 80)))
    assert occlusion.values.shape == (5, 80, speech.n_mel_audio)
    silenced = forced.audio.clone()
    silenced[..., 40:80] = baseline[..., 40:80]
    with torch.no_grad():
        p, q = forced.log_probs(forced.audio)[0], forced.log_probs(silenced)[0]  # [T, V]
    kl = (p.exp() * (p - q)).sum(-1)
    torch.testing.assert_close(occlusion.values[:, 0, 40], kl, atol=1e-4, rtol=1e-4)
    assert (occlusion.values[:, :, 40:80] == occlusion.values[:, :1, 40:41]).all()  # one patch
    assert (occlusion.values >= -1e-5).all()


@pytest.mark.slow
def test_alignment_table_of_real_whisper_is_finite_for_every_head(
    whisper: LoadedModel, audio: np.ndarray
) -> None:
    analysis = analyze_speech(
        whisper,
        audio,
        TEXT,
        methods=("gxi",),
        cost=SaliencyCost(batch_size=5),
        deletion_fractions=(0.0, 0.5),
        progress=False,
    )
    assert analysis.tokens == [" Open", " the", " window", ".", "<|endoftext|>"]
    rows = analysis.alignment.to_pylist()
    assert len(rows) == 4 * 6 + 4 + 1
    assert all(np.isfinite([r["pearson"], r["spearman"], r["topk_overlap"]]).all() for r in rows)
    print({layer: round(rho, 3) for layer, rho in analysis.layer_pearson("gxi").items()})
    deletion = {(r["ranking"], r["fraction"]): r["log_prob"] for r in analysis.deletion.to_pylist()}
    full = deletion[("random", 0.0)]
    assert deletion[("attention:all", 0.0)] == full  # nothing removed: the same forward pass
    assert deletion[("saliency:gradient_x_input", 0.5)] < full - 1  # half the audio silenced
