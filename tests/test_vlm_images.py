"""Huge images: overlays drawn and embedded at a bounded size, whatever the image's size, and a
clear error (not a traceback) for an image past PIL's decompression-bomb limit."""

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import attnscope as asc
from attnscope.cli import main
from attnscope.vlm import (
    ImageError,
    ImageLayout,
    analyze_image,
    load_image,
    overlay_figure,
    prepare,
)
from attnscope.vlm.images import OVERLAY_SIDE, fit_size, resized

SOURCE = re.compile(r'"source":\s*("data:image[^"]*")')  # a JSON string, "/" may be escaped


@pytest.fixture(scope="module")
def llava(cache_dir):
    return asc.load("tiny-llava")


def gradient(width: int, height: int) -> Image.Image:
    """Red grows with x, green with y."""
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)
    rgb = np.stack(
        [
            np.broadcast_to(x[None, :], (height, width)),
            np.broadcast_to(y[:, None], (height, width)),
            np.full((height, width), 128, np.float32),
        ],
        -1,
    )
    return Image.fromarray(rgb.astype(np.uint8))


def embedded_images(page: str) -> list[Image.Image]:
    """The images of the plotly image traces in a page (their ``source`` data URIs)."""
    uris = [json.loads(found) for found in SOURCE.findall(page)]
    assert all(re.match("data:image/(png|jpeg);base64,", uri) for uri in uris)
    return [Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) for uri in uris]


@pytest.fixture(scope="module")
def large_run(llava, tmp_path_factory):
    """A 4000 x 3000 image through ``attnscope vlm`` with 3 generated tokens."""
    folder = tmp_path_factory.mktemp("large")
    path = folder / "large.png"
    gradient(4000, 3000).save(path)
    out = folder / "run"
    argv = ["vlm", str(path), "--model", "tiny-llava", "--generate", "3", "--out", str(out)]
    assert main(argv) == 0
    return path, out


def test_large_image_overlays_are_bounded(large_run):
    _, out = large_run
    trace = asc.Trace.load(out)
    (span,) = ImageLayout.of(trace).images
    assert span.size == (4000, 3000)  # the layout stays in pixels of the original
    preview = np.asarray(resized(gradient(4000, 3000), (512, 384)))
    left = round(span.box[0] * 512 / 4000)  # the centre crop's left edge, drawn
    assert 0 < left < 256
    pngs = sorted((out / "overlays").glob("*.png"))
    assert len(pngs) == 3
    for png in pngs:
        assert png.stat().st_size < 1_000_000
        drawn = np.asarray(Image.open(png))
        assert drawn.shape == (384, 512, 3)
        # outside the region the model saw: the bounded copy of the image, dimmed
        np.testing.assert_array_equal(drawn[:, :left], preview[:, :left] // 2)
    page = (out / "overlays.html").read_text()
    assert len(page) < 6_000_000  # plotly.js (about 4.8 MB) + one small image + small grids
    (embedded,) = embedded_images(page)  # the image once, the tokens on a slider
    assert embedded.size == (512, 384)
    assert all(f"token {pos} " in page for pos in range(*trace.spans["response"]))  # slider
    assert (out / "report.html").stat().st_size < 6_000_000


def test_overlay_figure_embeds_one_bounded_image(large_run):
    path, out = large_run
    trace = asc.Trace.load(out)
    (span,) = ImageLayout.of(trace).images
    grids = {"a": torch.rand(span.rows, span.cols), "b": torch.rand(span.rows, span.cols)}
    fig = overlay_figure(load_image(path), grids, span, title="t")
    assert [t.type for t in fig.data] == ["image", "heatmap", "heatmap"]
    assert [t.visible for t in fig.data[1:]] == [True, False]
    (embedded,) = embedded_images(fig.to_json())
    assert embedded.size == fit_size((4000, 3000), OVERLAY_SIDE) == (512, 384)
    assert fig.data[0].dx == pytest.approx(4000 / 512) and fig.data[0].dy == pytest.approx(
        3000 / 384
    )
    steps = fig.layout.sliders[0].steps
    assert [s.label for s in steps] == ["a", "b"]
    assert [s.args[0]["visible"] for s in steps] == [[True, True, False], [True, False, True]]
    np.testing.assert_allclose(fig.data[2].z, grids["b"].numpy())


def test_rgb_images_are_not_copied():
    rgb, rgba = gradient(40, 30), gradient(40, 30).convert("RGBA")
    assert load_image(rgb) is rgb
    assert load_image(rgba).mode == "RGB"
    assert resized(rgb, rgb.size) is rgb


@pytest.mark.parametrize(
    ("size", "pixels", "limit"),
    [((150, 100), 15000, 10000), ((300, 200), 60000, 20000)],  # PIL's warning, PIL's error
)
def test_decompression_bomb_is_a_clear_error(
    llava, tmp_path, monkeypatch, capsys, size, pixels, limit
):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    path = tmp_path / "bomb.png"
    gradient(*size).save(path)
    expected = rf"image .*bomb\.png is too large.*\({pixels} pixels\).*limit of {limit}.*Downscale"
    with pytest.raises(ImageError, match=expected):
        analyze_image(llava, path, "What is this?", progress=False)
    out = tmp_path / "run"
    assert main(["vlm", str(path), "--model", "tiny-llava", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(f"attnscope: error: {expected}", err) and "Traceback" not in err
    assert not out.exists()
    allowed = tmp_path / "allowed.png"
    gradient(100, 100).save(allowed)  # at the limit: decoded as usual
    assert load_image(allowed).size == (100, 100)


def test_prepare_keeps_bounded_copies(llava, large_run):
    path, _ = large_run
    inputs = prepare(llava, path, "What is this?")
    assert inputs.layout.images[0].size == (4000, 3000)
    assert [im.size for im in inputs.images] == [(512, 384)]
