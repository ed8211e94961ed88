"""The explorer on real runs of every kind (causal LM, encoder, speech, VLM): attend-to rows
against eager attentions, and every view clicked through in headless Chromium."""

import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from dash.testing.wait import until
from PIL import Image
from reference import eager_attentions
from test_dashboard import _plot, _shot, _z
from test_dashboard import dash_duo as dash_duo  # the browser fixture

import attnscope as asc
from attnscope.dashboard import attend, callbacks, create_app, data, figures
from attnscope.dashboard.layout import GRAPHS
from attnscope.report import write_report
from attnscope.store import RunStore
from attnscope.tokentext import labels, tick_positions

TEXT = "The cat sat on the mat."


def reference_rows(q: torch.Tensor, k: torch.Tensor, params: dict, position: int) -> torch.Tensor:
    """``[H, Tk]`` softmax(q_t . k_s * scale) of one query over the keys it may see, float64."""
    group = q.shape[0] // k.shape[0]
    s = torch.einsum("hd,hsd->hs", q[:, position].double(), k.double().repeat_interleave(group, 0))
    s = s * params["scale"]
    keys = torch.arange(k.shape[1])
    if params["causal"]:
        s = s.masked_fill(keys > position, -math.inf)
    if params.get("sliding_window"):
        s = s.masked_fill(position - keys >= params["sliding_window"], -math.inf)
    return s.softmax(-1)


def test_attend_rows_equal_eager_attentions(tmp_path):
    lm = asc.load("tiny-gpt2")
    trace = asc.analyze(lm, TEXT, generate=3, keep_qk=True, progress=False)
    trace.save(tmp_path / "gpt2")
    data.clear_caches()
    store = RunStore(tmp_path)
    ids = torch.tensor([trace.token_ids])
    with torch.no_grad():
        eager = torch.stack(eager_attentions(lm.model, input_ids=ids))[:, 0]  # [L, H, T, T]
    for layer in trace.layers:
        rows, visible = attend.attention_rows(store, "gpt2", layer, [2, len(trace) - 1])
        torch.testing.assert_close(rows, eager[layer][:, [2, len(trace) - 1]], atol=2e-3, rtol=0)
        assert visible[0, :3].all() and not visible[0, 3:].any()  # causal
    dest = attend.destinations(store, "gpt2", 5)
    last = eager[:, :, 5]  # [L, H, T]
    mass, keys = last.topk(3, dim=-1)
    assert (dest.top_keys[..., 0] == keys[..., 0]).float().mean() > 0.95  # ties aside
    torch.testing.assert_close(dest.top_mass[..., 0], mass[..., 0], atol=2e-3, rtol=0)
    prompt = trace.spans["prompt"]
    torch.testing.assert_close(
        dest.span_mass["prompt"], last[..., prompt[0] : prompt[1]].sum(-1), atol=2e-3, rtol=0
    )
    torch.testing.assert_close(dest.span_mass["first token"], last[..., 0], atol=2e-3, rtol=0)
    fig = figures.attend_figure(
        rows[:, 0], visible[0], trace.tokens, 2, trace.layers[0], 1, log=False
    )
    bars = fig.data[0]
    np.testing.assert_allclose(bars.y[:3], rows[1, 0, :3], atol=1e-6)
    names = labels(trace.tokens)
    assert bars.text[1] == f"query 2 '{names[2]}' -> key 1 '{names[1]}': {float(rows[1, 0, 1]):.4f}"
    assert bars.text[4].endswith(": masked")


@pytest.fixture(scope="module")
def kind_runs(tmp_path_factory, cache_dir):
    """One short real run of each kind, with q/k of every layer (speech: its stored maps)."""

    root = tmp_path_factory.mktemp("kinds")
    lm = asc.load("gemma3-270m")
    asc.analyze(lm, TEXT, generate=3, keep_qk=True, progress=False).save(root / "gemma")
    lm = asc.load("minilm-l6")
    asc.analyze(lm, TEXT, keep_qk=True, progress=False).save(root / "minilm")
    from attnscope.speech import analyze_speech, speak
    from attnscope.speech.run import write_speech_run

    lm = asc.load("whisper-tiny-en")
    if shutil.which("espeak-ng"):
        audio = speak("the cat sat")
    else:  # a tone: the decoder is forced through the transcript
        audio = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        speech = analyze_speech(lm, audio, "the cat sat", methods=(), deletion_fractions=())
    write_speech_run(speech, root / "speech")
    from attnscope.commands.vlm import run_vlm

    image = np.stack([*np.meshgrid(np.arange(64), np.arange(48)), np.full((48, 64), 60)], -1)
    Image.fromarray((image * 3).astype(np.uint8)).save(root / "image.png")
    run_vlm(
        asc.load("tiny-llava"),
        [root / "image.png"],
        "USER: <image>\nWhat is here? ASSISTANT:",
        root / "vlm",
        generate=2,
        progress=False,
    )
    (root / "image.png").unlink()
    data.clear_caches()
    return root


@pytest.mark.slow
def test_heads_coloured_by_score_in_every_kind(kind_runs, tmp_path):
    """The "colour heads by" choices of each kind and the grid of each score: no span where the
    keys are audio frames, no receiver score where FAI is undefined; reports gain the grid."""
    store = RunStore(kind_runs)
    expected = {
        "gemma": ["receiver", "sink", "span"],
        "minilm": ["sink", "span"],
        "speech": [],  # cross-attention over audio frames: no head-table score
        "vlm": ["receiver", "sink", "span"],
    }
    for run, names in expected.items():
        trace = store.load(run)
        scores = data.load_scores(store, run)
        assert list(scores) == names, run
        wanted = {"run": run, "score": "span"}
        options, value = callbacks.score_view(store, run, None, wanted)
        assert [o["value"] for o in options] == [callbacks.OVERVIEW, *names]
        assert value == ("span" if names else callbacks.OVERVIEW)
        for name in names:
            fig, _ = callbacks.head_grid_view(store, run, None, name)
            np.testing.assert_allclose(fig.data[0].z, scores[name], rtol=1e-6)
        if names:
            sink = trace.cols["sink_score"][..., 0]
            np.testing.assert_allclose(scores["sink"], sink, rtol=1e-6)
            np.testing.assert_allclose(scores["span"], trace.head_span(), rtol=1e-6)
        else:  # the overview panels only
            fig, _ = callbacks.head_grid_view(store, run, None, "sink")
            assert len(fig.data) == len(figures.head_panels(trace))
        if run in ("gemma", "minilm"):  # the analyze report: strip, head maps, scores, patterns
            page = write_report(trace, tmp_path).read_text()
            assert page.count("plotly-graph-div") == 5, run
    vlm = (kind_runs / "vlm" / "report.html").read_text()  # written by the vlm command
    assert "Heads coloured by receiver (FAI kurtosis)" in vlm


def _displayed(duo, graph_id: str) -> bool:
    """The graph is shown and plotly has drawn its figure."""
    return duo.driver.execute_script(
        f"const g = document.getElementById('{graph_id}'); "
        "const gd = g.querySelector('.js-plotly-plot'); "
        "return getComputedStyle(g).display !== 'none' && !!gd && !!gd._fullData "
        "&& gd.data.length > 0"
    )


def _no_empty_view(duo) -> None:
    """Every graph on the page is hidden or shows data: no empty plot with a mode bar."""
    for graph_id in GRAPHS:
        shown = duo.driver.execute_script(
            f"return getComputedStyle(document.getElementById('{graph_id}')).display"
        )
        if shown != "none":
            assert _plot(duo, graph_id, "gd.data.length") > 0, graph_id


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.parametrize("run", ["gemma", "minilm", "speech", "vlm"])
def test_every_view_of_every_kind(dash_duo, kind_runs, run):
    duo = dash_duo
    store = RunStore(kind_runs)
    trace = store.load(run)
    layer, head, token = trace.layers[-1], trace.n_heads - 1, min(3, len(trace) - 1)
    duo.start_server(create_app(kind_runs))
    duo.driver.get(f"{duo.server_url}/?run={run}&layer={layer}&head={head}&token={token}")
    duo.wait_for_contains_text("#run-info", f"{run}: model", timeout=20)
    kind = {"gemma": "causal", "minilm": "bidirectional", "speech": "cross", "vlm": "causal"}[run]
    assert f"{kind} attention" in duo.find_element("#run-info").text
    if kind != "causal":
        assert "causal-only metrics (fai) are hidden" in duo.find_element("#run-info").text

    # token text on the strip's axis
    until(lambda: _displayed(duo, "strip"), 20)
    ticks = _plot(duo, "strip", "[gd.layout.xaxis.tickvals, gd.layout.xaxis.ticktext]")
    names = figures.names(trace.tokens)
    assert ticks[0] == tick_positions(len(trace)) and ticks[1] == [names[i] for i in ticks[0]]

    # where the linked token attends: values and token text against the trace
    until(lambda: _displayed(duo, "attend"), 30)
    title = _plot(duo, "attend", "gd.layout.title.text")
    assert f"where token {token} '{names[token]}' attends, layer {layer}" in title
    bars = _plot(duo, "attend", "[Array.from(gd._fullData[0].y), gd._fullData[0].text]")
    if run == "speech":
        from safetensors.torch import load_file

        maps = load_file(str(kind_runs / run / attend.SPEECH_MAPS))["cross_attention"]
        expected = maps[trace.layers.index(layer), head, token].double()
        key = "frame 0 (0.00 s)"
    else:
        q, k, params = trace.layer_qk(layer)
        expected = reference_rows(q.float(), k.float(), params, token)[head]
        key = f"0 '{names[0]}'"
    np.testing.assert_allclose(bars[0], expected.nan_to_num(), atol=2e-4)
    assert bars[1][0] == f"query {token} '{names[token]}' -> key {key}: {float(expected[0]):.4f}"
    until(lambda: _displayed(duo, "destinations"), 20)
    shown = _z(duo, "destinations")  # share of the top key per layer and head
    top = expected.max()
    assert shown[trace.layers.index(layer), head] == pytest.approx(float(top), abs=2e-4)

    # heads: grid, overview thumbnails (click one to enlarge), heatmap, head view
    until(lambda: _displayed(duo, "head-grid") and _displayed(duo, "overview"), 30)
    assert _plot(duo, "head-grid", "gd._fullLayout.height") >= 300
    until(lambda: _displayed(duo, "heatmap"), 30)
    duo.wait_for_contains_text("#head-title", f"layer {layer} head {head}", timeout=20)
    thumbs, layers = attend.thumbnails(store, run, 0, 256, figures.THUMB)
    rows, cols = thumbs[(layers[0], 0)].shape  # a cell in the lower left of the first tile
    x, y = cols // 4, rows * 3 // 4
    duo.driver.execute_script(  # plotly's click event, as a click on that cell emits it
        "const gd = document.querySelector('#overview .js-plotly-plot');"
        f"gd.emit('plotly_click', {{points: [{{curveNumber: 0, pointNumber: [{y}, {x}], "
        f"x: {x}, y: {y}}}]}})"
    )
    first = layers[0]
    duo.wait_for_contains_text("#head-title", f"layer {first} head 0", timeout=20)
    until(lambda: f"layer={first}&head=0" in duo.driver.current_url, 10)
    until(lambda: f"layer {first} head 0" in _plot(duo, "heatmap", "gd.layout.title.text"), 20)
    if run != "speech":
        until(lambda: _displayed(duo, "head-lines"), 20)
        assert "head view: layer" in _plot(duo, "head-lines", "gd.layout.title.text")
    else:
        assert _plot(duo, "heatmap", "gd.data.length") == 2  # spectrogram + tokens x frames
    _no_empty_view(duo)
    _shot(duo, f"kind-{run}")
    assert not [e for e in duo.get_logs() or [] if e.get("level") == "SEVERE"], duo.get_logs()


@pytest.mark.slow
def test_export_data_and_png(tmp_path):
    """A view's data as CSV / Parquet (one row per plotted value) and its figure as PNG."""
    import io

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from attnscope.dashboard.export import export_bytes, figure_table

    rows = torch.tensor([[0.7, 0.3, 0.0], [0.5, 0.25, 0.25]])
    visible = torch.tensor([True, True, False])
    fig = figures.attend_figure(rows, visible, ["<s>", "Ġcat", "Ġsat"], 1, 0, 0)
    browser_json = fig.to_plotly_json()  # what dcc.Graph hands back (typed arrays included)
    table = figure_table(browser_json)
    heads = table.filter(pa_equal(table, "panel", "layer 0"))
    np.testing.assert_allclose(
        np.array(heads["value"].to_pylist()).reshape(2, 3),
        [[0.7, 0.3, np.nan], [0.5, 0.25, np.nan]],
    )
    assert heads["text"][1].as_py() == "query 1 '␣cat' -> key 1 '␣cat': 0.3000"
    csv = pacsv.read_csv(io.BytesIO(export_bytes(browser_json, "csv")))
    assert csv.num_rows == table.num_rows
    back = pq.read_table(io.BytesIO(export_bytes(browser_json, "parquet")))
    assert back.schema.equals(table.schema) and back["text"].equals(table["text"])
    np.testing.assert_array_equal(back["value"].to_numpy(), table["value"].to_numpy())
    png = export_bytes(browser_json, "png")  # kaleido drives Debian chromium, offline
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(png)).size == (1300, fig.layout.height)


def pa_equal(table, column: str, value: str):
    import pyarrow.compute as pc

    return pc.equal(table[column], value)
