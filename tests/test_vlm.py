"""VLM support on tiny LLaVA (fixed patch grid) and Qwen2-VL (dynamic resolution): image spans and
patch grids against the processors' own layout, visual statistics against eager attentions."""

import numpy as np
import pytest
import torch
from PIL import Image
from reference import assert_trace_matches, eager_attentions

import attnscope as asc
from attnscope import metrics
from attnscope.cli import main
from attnscope.errors import AttnscopeError
from attnscope.vlm import (
    ImageError,
    ImageLayout,
    analyze_image,
    overlay,
    overlay_figure,
    prepare,
    token_heatmaps,
    visual_entropy,
    visual_heads,
    visual_mass,
    visual_sinks,
)

MODELS = ["tiny-llava", "tiny-qwen2-vl"]
TOL = 1e-4


@pytest.fixture(scope="module", params=MODELS)
def lm(request, cache_dir):
    return asc.load(request.param)


def gradient_image(path, width: int, height: int):
    """Red grows with x, green with y: a pixel's colour says where it came from."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture
def images(tmp_path):
    return [
        gradient_image(tmp_path / "wide.png", 130, 100),
        gradient_image(tmp_path / "tall.png", 70, 120),
    ]


def full_sequence_inputs(lm, inputs, trace):
    """Processor tensors with the trace's whole token sequence (prompt + response)."""
    tensors = dict(inputs.tensors)
    ids = torch.tensor([trace.token_ids])
    tensors.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    if "mm_token_type_ids" in tensors:
        tensors["mm_token_type_ids"] = (ids == lm.model.config.image_token_id).int()
    return tensors


def patch_colour(lm, pixel_values, image_index, vision_token):
    """Mean RGB (0-255) of the centre of one vision-tower patch, as the processor encoded it."""
    ip = lm.processor.image_processor
    mean, std = (
        torch.tensor(ip.image_mean)[:, None, None],
        torch.tensor(ip.image_std)[:, None, None],
    )
    if lm.model.config.model_type == "llava":
        p = lm.model.config.vision_config.patch_size
        side = pixel_values.shape[-1] // p
        r, c = divmod(vision_token - 1, side)  # vision token 0 is CLIP's class token
        patch = pixel_values[image_index, :, r * p : (r + 1) * p, c * p : (c + 1) * p]
    else:
        p = ip.patch_size
        patch = pixel_values[vision_token].view(3, ip.temporal_patch_size, p, p)[:, 0]
    centre = patch[:, p // 2 - 1 : p // 2 + 1, p // 2 - 1 : p // 2 + 1]
    return ((centre * std + mean) * 255).mean((1, 2))


def test_layout_matches_processor(lm, images):
    inputs = prepare(lm, images, "Compare the two pictures.")
    ids = inputs.tensors["input_ids"][0]
    image_positions = (ids == lm.model.config.image_token_id).nonzero()[:, 0]
    layout = inputs.layout
    assert torch.equal(layout.positions, image_positions)
    assert [s.name for s in layout.images] == ["image:0", "image:1"]
    if lm.model.config.model_type == "llava":
        side = inputs.tensors["pixel_values"].shape[-1] // lm.model.config.vision_config.patch_size
        assert [(s.rows, s.cols) for s in layout.images] == [(side, side)] * 2
    else:  # dynamic resolution: each image its own grid, merged 2 x 2
        grids = (inputs.tensors["image_grid_thw"][:, 1:] // 2).tolist()
        assert [[s.rows, s.cols] for s in layout.images] == grids
        assert layout.images[0].rows * layout.images[0].cols != len(layout.images[1])
    for i, (span, path) in enumerate(zip(layout.images, images, strict=True)):
        assert span.size == Image.open(path).size
        w, h = span.size
        for j, tokens in enumerate(span.vision_tokens().tolist()):
            row, col = divmod(j, span.cols)
            for sub, token in enumerate(tokens):  # the patches merged into LLM token j
                sr, sc = divmod(sub, span.merge)
                left, top, right, bottom = span.cell_box(row, col)
                x = left + (sc + 0.5) * (right - left) / span.merge
                y = top + (sr + 0.5) * (bottom - top) / span.merge
                expected = torch.tensor([x / (w - 1) * 255, y / (h - 1) * 255, 128.0])
                got = patch_colour(lm, inputs.tensors["pixel_values"], i, token)
                torch.testing.assert_close(got, expected, atol=6, rtol=0)


@pytest.fixture(scope="module")
def analysed(lm, tmp_path_factory):
    """A two-image run with generation and the eager attentions of its final sequence."""
    folder = tmp_path_factory.mktemp("images")
    paths = [gradient_image(folder / "a.png", 120, 90), gradient_image(folder / "b.png", 64, 96)]
    prompt = "Which picture is brighter?"
    trace = analyze_image(lm, paths, prompt, generate=4, progress=False)
    inputs = prepare(lm, paths, prompt)
    attn = torch.stack(eager_attentions(lm.model, **full_sequence_inputs(lm, inputs, trace)))
    return trace, attn[:, 0], inputs.layout  # attn [L, H, T, T]


def test_visual_statistics_match_eager(analysed):
    trace, attn, layout = analysed
    assert ImageLayout.of(trace) == layout
    assert set(trace.spans) == {"prompt", "response", "image:0", "image:1"}
    assert_trace_matches(trace, attn)
    image = layout.positions
    torch.testing.assert_close(visual_mass(trace), attn[..., image].sum(-1), atol=TOL, rtol=TOL)
    for span in layout.images:
        torch.testing.assert_close(
            trace.rows[f"span_mass:{span.name}"],
            attn[..., span.start : span.end].sum(-1),
            atol=TOL,
            rtol=TOL,
        )
    for position in (len(trace) - 1, trace.spans["response"][0]):
        p = attn[:, :, position, image]
        expected = metrics.entropy((p / p.sum(-1, keepdim=True))[..., None, :])[..., 0]
        torch.testing.assert_close(visual_entropy(trace, position), expected, atol=TOL, rtol=TOL)


def test_token_heatmaps_match_eager(analysed):
    trace, attn, layout = analysed
    position = trace.spans["response"][0] + 1
    grids = token_heatmaps(trace, position)
    one_head = token_heatmaps(trace, position, layers=[1], heads=[2])
    for span, grid, single in zip(layout.images, grids, one_head, strict=True):
        row = attn[:, :, position, span.start : span.end]  # [L, H, n]
        expected = row.mean((0, 1)).reshape(span.rows, span.cols)
        torch.testing.assert_close(grid, expected, atol=1e-6, rtol=TOL)
        torch.testing.assert_close(
            single, row[1, 2].reshape(span.rows, span.cols), atol=1e-6, rtol=TOL
        )


def test_visual_sinks_and_heads_match_eager(analysed):
    trace, attn, layout = analysed
    score = metrics.sink_score(attn, mask=attn > 0)  # [L, H, T]
    factor = 1.5
    sinks = visual_sinks(trace, factor)
    assert not sinks[..., : layout.images[0].start].any()
    for span in layout.images:
        ref = score[..., span.start : span.end]
        limit = factor * ref.mean(-1, keepdim=True)
        clear = (ref - limit).abs() > 1e-3  # away from the threshold
        got = sinks[..., span.start : span.end]
        assert torch.equal(got[clear], (ref > limit)[clear])
    start, end = trace.spans["response"]
    mass = attn[..., layout.positions].sum(-1)[..., start:end].mean(-1)  # [L, H]
    heads = visual_heads(trace, fraction=0.25)
    chosen = torch.stack([heads[layer] for layer in trace.layers])
    assert int(chosen.sum()) == 2  # 25% of 2 layers x 4 heads
    assert mass[chosen].min() > mass[~chosen].max() - 1e-5
    with pytest.raises(AttnscopeError, match="no captured layer"):
        visual_heads(trace, layers=(5, 9))


def test_overlays_png_and_plotly(analysed, tmp_path):
    trace, _, layout = analysed
    span = layout.images[0]
    image = Image.new("RGB", span.size, (200, 100, 50))
    grid = token_heatmaps(trace, len(trace) - 1)[0]
    out = overlay(image, grid, span)
    assert out.size == image.size
    pixels = np.asarray(out).reshape(-1, 3)
    dimmed = (pixels == [100, 50, 25]).all(-1)  # outside the region the model saw
    left, top, right, bottom = (round(v) for v in span.box)
    assert dimmed.sum() == span.size[0] * span.size[1] - (right - left) * (bottom - top)
    fig = overlay_figure(image, grid, span, title="t")
    assert [t.type for t in fig.data] == ["image", "heatmap"]
    assert np.allclose(fig.data[1].z, grid.numpy())


def test_cli_writes_run_with_overlays(lm, images, tmp_path):
    out = tmp_path / "run"
    argv = ["vlm", str(images[0]), "--model", lm.name, "--generate", "3", "--out", str(out)]
    assert main(argv) == 0
    trace = asc.Trace.load(out)
    assert trace.meta["model"] == lm.name and "image:0" in trace.spans
    assert ImageLayout.of(trace).images[0].size == (130, 100)
    pngs = sorted((out / "overlays").glob("*.png"))
    assert len(pngs) == 3  # one per response token
    assert Image.open(pngs[0]).size == (130, 100)
    assert (out / "overlays.html").read_text().count("plotly") > 0
    assert (out / "report.html").is_file()
    assert main(argv) == 2  # exists, no --overwrite


def test_errors_name_the_problem(lm, images, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really an image")
    with pytest.raises(ImageError, match=r"cannot decode image .*broken\.png"):
        analyze_image(lm, broken, "What is this?")
    with pytest.raises(ImageError, match="does not exist"):
        prepare(lm, tmp_path / "missing.png", "What is this?")
    assert main(["vlm", str(broken), "--model", lm.name, "--out", str(tmp_path / "r")]) == 2
    assert "cannot decode image" in capsys.readouterr().err
    with pytest.raises(AttnscopeError, match="no image given"):
        prepare(lm, [], "What is this?")


def test_text_model_has_no_image_tokens(images, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path / "cache"))
    text_lm = asc.load("tiny-llama")
    with pytest.raises(AttnscopeError, match="without image tokens"):
        analyze_image(text_lm, images[0], "What is this?")
