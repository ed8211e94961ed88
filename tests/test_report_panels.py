"""Reports read at any depth: every layer x head panel keeps its height, token text labels the
strips and hovers, encoder runs hide causal-only metrics, patterns match the definition."""

import json
import math
from types import SimpleNamespace

import numpy as np
import plotly.graph_objects as go
import pyarrow as pa
import pytest
import torch
from PIL import Image

from attnscope import metrics
from attnscope.kernels.table import CAUSAL_ONLY
from attnscope.patterns import LOG_FLOOR, attend_to, attention_heatmap, attention_rows
from attnscope.report import PANEL_MIN, PLOTLY_FILE, head_maps, token_strip, write_report
from attnscope.speech.plots import alignment_figure, token_figure, token_frame_maps
from attnscope.tokentext import readable
from attnscope.trace import Trace
from attnscope.vlm.heatmap import overlay, overlay_figure, token_heatmaps
from attnscope.vlm.layout import ImageLayout, ImageSpan
from attnscope.vlm.report import visual_head_maps, write_overlays

TOKENS = ["<bos>", "Ġthe", "Ġcat", "Ċ", "Ġsat", "Ġon", "Ġthe", "Ġmat", ".", "Ġit"]


def synthetic_trace(n_layers: int, n_heads: int = 4, kind: str = "causal", qk: bool = True):
    """A trace of random statistics and random kept queries/keys (no model)."""
    t, d = len(TOKENS), 8
    layers = list(range(n_layers))
    rand = lambda: torch.rand(n_layers, n_heads, t)  # noqa: E731
    rows = {"waad": rand() * 5, "entropy": rand(), "mean_distance": rand() * 4}
    cols = {"sink_score": rand(), "fai": rand()}
    attention = dict(scale=d**-0.5, causal=kind == "causal", sliding_window=None, softcap=None)
    return Trace(
        tokens=TOKENS,
        token_ids=list(range(t)),
        spans={"prompt": (0, 6), "response": (6, t)},
        layers=layers,
        n_heads=n_heads,
        rows=rows,
        cols=cols,
        meta={
            "model": f"synthetic-{n_layers}",
            "attention": kind,
            "qk_attention": {str(li): attention for li in layers} if qk else {},
        },
        qk={li: (torch.randn(n_heads, t, d), torch.randn(n_heads // 2, t, d)) for li in layers}
        if qk
        else {},
    )


def panel_heights(fig: go.Figure) -> list[float]:
    """Plot-area height (px) of every heatmap panel of a figure."""
    layout = fig.layout
    area = layout.height - layout.margin.t - layout.margin.b
    heights = []
    for tr in fig.select_traces(selector=dict(type="heatmap")):
        axis = "yaxis" + (tr.yaxis or "y")[1:]
        lo, hi = layout[axis].domain
        heights.append((hi - lo) * area)
    return heights


def reference_rows(q, k, head, scale, causal):
    """softmax(q k^T * scale) of one head, written from the definition (GQA: head // group)."""
    kk = k[head // (q.shape[0] // k.shape[0])]
    s = (q[head] @ kk.T) * scale
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), -math.inf)
    return torch.softmax(s, -1)


@pytest.mark.parametrize("n_layers", [2, 6])
@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_layer_head_panels_keep_their_height(n_layers, kind):
    fig = head_maps(synthetic_trace(n_layers, kind=kind))
    heights = panel_heights(fig)
    assert len(heights) == 3
    assert min(heights) >= PANEL_MIN >= 200


def test_token_text_on_strip_axis_and_hover():
    trace = synthetic_trace(2)
    fig = token_strip(trace)
    bottom = fig.layout[f"xaxis{len(fig.data)}"]
    assert list(bottom.ticktext) == [readable(t) for t in TOKENS]
    assert list(bottom.tickvals) == list(range(len(TOKENS)))
    assert fig.data[0].text[0][2] == "2 ␣cat" and "%{text}" in fig.data[0].hovertemplate


def test_encoder_strip_hides_causal_only_metrics():
    causal = {tr.colorbar.title.text for tr in token_strip(synthetic_trace(2)).data}
    encoder = token_strip(synthetic_trace(2, kind="bidirectional"))
    shown = {tr.colorbar.title.text for tr in encoder.data}
    assert set(CAUSAL_ONLY) <= causal and not set(CAUSAL_ONLY) & shown
    titles = [
        a.text for a in head_maps(synthetic_trace(2, kind="bidirectional")).layout.annotations
    ]
    assert any("|t - s|" in t for t in titles)


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_attention_rows_match_the_definition(kind):
    trace = synthetic_trace(2, kind=kind)
    q, k = trace.qk[1]
    probs, visible = attention_rows(trace, 1, [3, 9], [0, 3])
    for i, head in enumerate([0, 3]):
        ref = reference_rows(q, k, head, 8**-0.5, kind == "causal")[[3, 9]]
        torch.testing.assert_close(probs[i], ref, rtol=1e-5, atol=1e-6)
    assert visible[0].tolist() == [s <= 3 or kind != "causal" for s in range(len(TOKENS))]


def test_heatmap_masks_future_log_scale_and_mass_outside_window():
    trace = synthetic_trace(2)
    q, k = trace.qk[0]
    ref = reference_rows(q, k, 1, 8**-0.5, True)
    fig = attention_heatmap(trace, 0, 1, rows=(4, 8), keys=(2, 8))
    z, custom = fig.data[0].z, fig.data[0].customdata
    assert math.isnan(z[0][3])  # row 4 cannot see key 5: masked, not zero
    assert z[0][0] == pytest.approx(math.log10(max(float(ref[4, 2]), LOG_FLOOR)), abs=1e-5)
    outside = 1 - ref[4:8, 2:8].sum(-1)  # the keys 0 and 1 are outside the window
    assert [c[0][1] for c in custom] == pytest.approx(outside.tolist(), abs=1e-5)
    assert fig.layout.plot_bgcolor and "masked" in fig.layout.title.text
    assert "→" in fig.data[0].text[0][0] and "␣" in fig.data[0].text[0][0]


def test_attend_to_one_head_and_every_head():
    trace = synthetic_trace(2)
    q, k = trace.qk[1]
    one = attend_to(trace, 5, layer=1, head=2)
    ref = reference_rows(q, k, 2, 8**-0.5, True)[5, :6]
    assert list(one.data[0].y) == pytest.approx(ref.tolist(), abs=1e-6)
    every = attend_to(trace, 5, layer=1)
    assert len(every.data[0].z) == trace.n_heads and len(every.data[0].z[0]) == 6
    assert "␣sat" in every.layout.title.text


@pytest.mark.parametrize("n_layers", [2, 6])
def test_written_report_holds_patterns(n_layers, tmp_path):
    page = write_report(synthetic_trace(n_layers), tmp_path).read_text()
    assert page.count("plotly-graph-div") == 5  # strip, head maps, head scores, 2 patterns
    assert json.dumps("␣cat")[1:-1] in page  # token text, as plotly's JSON writes it


def vlm_trace(n_layers: int, n_response: int = 12):
    """A synthetic VLM trace: token 0, an 8 x 8 image at positions 1..64, a prompt token, then
    ``n_response`` response tokens, with random kept queries and keys."""
    t, d, n_heads, span = (
        66 + n_response,
        8,
        4,
        ImageSpan(
            name="image:0",
            start=1,
            end=65,
            rows=8,
            cols=8,
            box=(40.0, 0.0, 280.0, 240.0),
            size=(320, 240),
            vision_batch=0,
            vision_start=1,
            merge=1,
        ),
    )
    layers = list(range(n_layers))
    attention = dict(scale=d**-0.5, causal=True, sliding_window=None, softcap=None)
    return Trace(
        tokens=["<s>", *["<image>"] * 64, "Ġsay", *[f"Ġw{i}" for i in range(n_response)]],
        token_ids=list(range(t)),
        spans={"image:0": (1, 65), "prompt": (0, 66), "response": (66, t)},
        layers=layers,
        n_heads=n_heads,
        rows={"span_mass:image:0": torch.rand(n_layers, n_heads, t)},
        cols={"sink_score": torch.rand(n_layers, n_heads, t)},
        meta={
            "model": "synthetic-vlm",
            "attention": "causal",
            "images": ImageLayout((span,)).to_meta(),
            "qk_attention": {str(li): attention for li in layers},
        },
        qk={li: (3 * torch.randn(n_heads, t, d), torch.randn(n_heads, t, d)) for li in layers},
    )


@pytest.mark.parametrize("n_layers", [2, 6])
def test_visual_head_maps_keep_their_height(n_layers):
    heights = panel_heights(visual_head_maps(vlm_trace(n_layers)))
    assert len(heights) == 2 and min(heights) >= PANEL_MIN


def test_overlays_for_12_tokens_are_small_and_share_one_scale(tmp_path):
    trace = vlm_trace(2)
    image = Image.effect_noise((320, 240), 64).convert("RGB")  # hard to compress
    page, pngs = write_overlays(trace, [image], tmp_path)
    assert page.stat().st_size < 3_000_000 and len(pngs) == 12
    assert (tmp_path / PLOTLY_FILE).is_file()  # plotly.js once, beside the pages
    text = page.read_text()
    assert f'src="{PLOTLY_FILE}"' in text and "plotly.js v" not in text
    grids = [token_heatmaps(trace, pos)[0] for pos in range(66, 78)]
    fig = overlay_figure(
        image, {str(i): g for i, g in enumerate(grids)}, ImageLayout.of(trace).images[0]
    )
    heatmaps = list(fig.select_traces(selector=dict(type="heatmap")))
    assert len(heatmaps) == 12 and {h.coloraxis for h in heatmaps} == {"coloraxis"}
    assert fig.layout.coloraxis.cmin == 0
    assert fig.layout.coloraxis.cmax == pytest.approx(max(float(g.max()) for g in grids))
    # the PNGs share that scale: the weakest token's PNG is drawn against the strongest one's max
    span = ImageLayout.of(trace).images[0]
    weakest = min(range(12), key=lambda i: float(grids[i].max()))
    shared = max(float(g.max()) for g in grids)
    assert float(grids[weakest].max()) < shared
    written = np.asarray(Image.open(pngs[weakest]))
    assert np.array_equal(written, np.asarray(overlay(image, grids[weakest], span, vmax=shared)))
    assert not np.array_equal(written, np.asarray(overlay(image, grids[weakest], span)))


@pytest.mark.parametrize("n_layers", [2, 6])
def test_speech_panels_keep_their_height(n_layers):
    n_heads, methods = 6, ("gxi", "occlusion")
    rows = [
        {"scope": "head", "method": m, "layer": li, "head": h, "pearson": float(torch.rand(1))}
        for m in methods
        for li in range(n_layers)
        for h in range(n_heads)
    ]
    analysis = SimpleNamespace(
        alignment=pa.Table.from_pylist(rows),
        cross=SimpleNamespace(
            layers=list(range(n_layers)), maps=torch.rand(n_layers, n_heads, 5, 9)
        ),
    )
    fig = alignment_figure(analysis)
    assert len(panel_heights(fig)) == 2 and min(panel_heights(fig)) >= PANEL_MIN
    z = fig.data[1].z  # occlusion, layer x head as given
    assert z[n_layers - 1][n_heads - 1] == pytest.approx(rows[-1]["pearson"])
    encoder = head_maps(synthetic_trace(n_layers, kind="bidirectional"))  # the encoder panel
    assert min(panel_heights(encoder)) >= PANEL_MIN


def test_speech_figures_name_tokens_readably():
    tokens, frames, mels = ["ĠOpen", "Ġthe", "<|endoftext|>"], 9, 18
    speech = SimpleNamespace(
        frame_seconds=0.02,
        mel_per_frame=2,
        n_mel_audio=mels,
        frame_times=lambda: np.arange(frames) * 0.02,
        features=torch.rand(1, 4, 30),
    )
    analysis = SimpleNamespace(
        speech=speech,
        cross=SimpleNamespace(tokens=tokens, maps=torch.rand(2, 3, len(tokens), frames)),
        tokens=tokens,
        saliency={"gxi": SimpleNamespace(values=torch.rand(len(tokens), 4, mels))},
        pooled={"gxi": torch.rand(len(tokens), frames)},
        words=[],
    )
    fig = token_figure(analysis, 0)
    assert fig.layout.title.text == "token 0: ␣Open"
    assert [a.text for a in fig.layout.annotations][1] == "|gxi| for ␣Open"
    maps = token_frame_maps(analysis)
    assert list(maps.data[0].y) == ["0 ␣Open", "1 ␣the", "2 <|endoftext|>"]


def test_heads_are_ranked_by_span_and_never_by_a_signed_one():
    trace = synthetic_trace(6, kind="bidirectional")
    fig = head_maps(trace)
    span = trace.head_span()
    local = metrics.head_groups(span)["local"]
    li, h = (int(i) for i in local.nonzero()[0])
    assert "local" in fig.data[0].text[li][h]
    trace.rows["mean_distance"] -= 3  # signed distances of an older encoder run
    fig = head_maps(trace)
    assert "not ranked" in fig.layout.annotations[0].text
    assert not any("local" in t or "global" in t for row in fig.data[0].text for t in row)
