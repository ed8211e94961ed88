"""Dash explorer: view functions and figures against Trace values; the app in headless Chromium."""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from dash.testing.wait import until

import attnscope as asc
from attnscope.cli import main
from attnscope.dashboard import attend, callbacks, create_app, data, figures
from attnscope.errors import AttnscopeError
from attnscope.store import RunStore
from attnscope.trace import QK_FILE, StoredQK, Trace

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,4200",
)
SCALE = 0.35


def random_trace(n=40, n_layers=2, n_heads=4, kv_heads=2, d=8, qk_layers=(1,), seed=0) -> Trace:
    """Random statistics for every metric the explorer shows, and q/k for ``qk_layers``."""
    g = torch.Generator().manual_seed(seed)
    shape = (n_layers, n_heads, n)
    rows = {m: torch.rand(shape, generator=g) for m in ("entropy", "waad", "sink_mass")}
    rows["mean_distance"] = torch.rand(shape, generator=g) * torch.arange(n)
    cols = {m: torch.rand(shape, generator=g) for m in ("received", "fai", "sink_score")}
    cols["fai"][..., -5:] = float("nan")
    return Trace(
        tokens=[f"t{i}" for i in range(n)],
        token_ids=list(range(n)),
        spans={"prompt": (0, n // 2), "response": (n // 2, n)},
        layers=list(range(n_layers)),
        n_heads=n_heads,
        rows=rows,
        cols=cols,
        meta={
            "model": "unit",
            "qk_attention": {
                str(layer): {"scale": SCALE, "causal": True, "sliding_window": None}
                for layer in qk_layers
            },
        },
        qk={
            layer: (
                torch.randn(n_heads, n, d, generator=g),
                torch.randn(kv_heads, n, d, generator=g),
            )
            for layer in qk_layers
        },
    )


def dense_attention(q: torch.Tensor, k: torch.Tensor, head: int) -> torch.Tensor:
    """Causal softmax attention of one head, ``[T, T]`` (the reference for the heatmap)."""
    s = q[head] @ k[head // (q.shape[0] // k.shape[0])].T * SCALE
    s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), -math.inf)
    return s.softmax(-1)


@pytest.fixture
def store(tmp_path):
    data.clear_caches()
    random_trace(seed=0).save(tmp_path / "a")
    random_trace(seed=1, n_layers=3, qk_layers=()).save(tmp_path / "b")
    return RunStore(tmp_path)


# -- (a) data and figures ---------------------------------------------------------------------
def test_token_strip_is_the_head_mean(store):
    trace = store.load("a")
    fig = figures.token_strip(trace, "waad")
    np.testing.assert_allclose(fig.data[0].z[0], trace.rows["waad"].mean((0, 1)), rtol=1e-6)
    assert fig.data[0].text[0][7] == "7 't7'" and "waad = %{z:.4f}" in fig.data[0].hovertemplate
    assert list(fig.layout.xaxis.ticktext[:2]) == ["t0", "t1"]  # token text on the axis
    fig = figures.token_strip(trace, "fai", 1)  # a column metric on one layer, NaN-aware
    expected = torch.nanmean(trace.cols["fai"][1], 0)
    np.testing.assert_allclose(fig.data[0].z[0], expected, rtol=1e-6)
    assert np.isnan(fig.data[0].z[0][-1]) and "layer 1" in fig.layout.title.text
    trace.tokens[3] = "<s>"  # plotly reads labels as markup
    assert figures.token_strip(trace, "waad").data[0].text[0][3] == "3 '&lt;s&gt;'"
    fig, _ = callbacks.strip_view(store, "a", "entropy", 0)  # layer 0 is not "all layers"
    np.testing.assert_allclose(fig.data[0].z[0], trace.rows["entropy"][0].mean(0), rtol=1e-6)


def test_run_comparison_aligns_layers_by_relative_depth(store):
    head = {"layer": 1, "head": 0}
    fig, grids, strips, pair, msg = callbacks.compare_view(store, "a", "b", "entropy", head, 0, 40)
    assert "b: layer 2 has no kept queries/keys" in msg.children  # b's layer at a's depth
    assert [t.name for t in fig.data] == ["a", "b"]
    assert fig.layout.xaxis.title.text.startswith("relative depth")  # 2 vs 3 layers
    for line, name in zip(fig.data, "ab", strict=True):
        trace = store.load(name)
        np.testing.assert_allclose(line.x, np.linspace(0, 1, len(trace.layers)))
        np.testing.assert_allclose(line.y, trace.rows["entropy"].mean((1, 2)), rtol=1e-6)
    a, b = store.load("a"), store.load("b")
    mean_a, mean_b = a.rows["entropy"].mean(-1), b.rows["entropy"].mean(-1)
    np.testing.assert_allclose(grids.data[0].z, mean_a, rtol=1e-6)
    np.testing.assert_allclose(grids.data[1].z, mean_b[[0, 2]], rtol=1e-6)  # depth 0 and 1
    np.testing.assert_allclose(grids.data[2].z, mean_a - mean_b[[0, 2]], rtol=1e-5, atol=1e-6)
    diff = strips.data[2].z[0]  # same tokens in both runs: a difference everywhere
    np.testing.assert_allclose(
        diff, a.rows["entropy"].mean((0, 1)) - b.rows["entropy"].mean((0, 1)), atol=1e-6
    )
    assert not pair.data  # b kept no q/k: no heatmap pair
    fig, *others, _ = callbacks.compare_view(store, "a", "a", "entropy", head, 0, 40)
    assert len(fig.data) == 1 and not any(o.data for o in others)


def test_token_detail_maps_and_table(store):
    trace = store.load("a")
    fig, table, title = callbacks.token_view(store, "a", 37, "waad")
    assert [a.text for a in fig.layout.annotations][:3] == ["waad", "fai", "received"]
    for panel, name in zip(fig.data, ["waad", "fai", "received"], strict=True):
        values = {**trace.rows, **trace.cols}[name][..., 37].numpy()
        np.testing.assert_allclose(panel.z, values, rtol=1e-6)
    assert list(fig.data[0].y) == ["L0", "L1"] and list(fig.data[0].x) == ["h0", "h1", "h2", "h3"]
    cells = {
        row.children[0].children: [td.children for td in row.children] for row in table.children[1:]
    }
    assert cells["entropy"][2] == data.fmt(trace.rows["entropy"][..., 37].mean().item())
    assert cells["fai"][2] == "nan"  # token 37 is within the FAI horizon of no query
    sink = trace.cols["sink_score"][..., 37]
    li, h = divmod(int(sink.argmax()), trace.n_heads)
    assert cells["sink_score"][3:] == [data.fmt(sink.max().item()), f"L{li} h{h}"]
    assert title.children == "token 37 't37'"
    with pytest.raises(AttnscopeError, match="outside"):
        callbacks.token_view(store, "a", 40, "waad")


def test_head_grid_marks_groups_and_head_detail(store):
    trace = store.load("a")
    fig = figures.head_grid(trace)
    np.testing.assert_allclose(fig.data[0].z, trace.head_span(), rtol=1e-6)
    np.testing.assert_allclose(fig.data[2].z, trace.cols["sink_score"][..., 0], rtol=1e-6)
    assert "(bottom/top 30% by head span), s = sink (alpha_0 > 0.3)" in fig.layout.title.text
    marks = fig.data[3]  # text overlay of the first panel: one point per head in a group
    groups, sink = trace.head_groups(), trace.sink_heads()
    assert len(marks.text) == int((groups["local"] | groups["global"] | sink).sum()) > 0
    for x, y, text in zip(marks.x, marks.y, marks.text, strict=True):
        li, h = int(y[1:]), int(x[1:])
        assert ("l" in text) == bool(groups["local"][li, h])
        assert ("g" in text) == bool(groups["global"][li, h])
        assert ("s" in text) == bool(sink[li, h])
    curve, title = callbacks.head_view(store, "a", {"layer": 1, "head": 2}, "waad")
    np.testing.assert_allclose(curve.data[0].y, trace.rows["waad"][1, 2], rtol=1e-6)
    assert f"head span {data.fmt(trace.head_span()[1, 2].item())}" in title.children
    assert f"sink score of token 0 {data.fmt(trace.cols['sink_score'][1, 2, 0].item())}" in (
        title.children
    )
    assert callbacks.default_head(store, "a") == {"layer": 1, "head": 0}  # first layer with q/k


def test_heatmap_is_exact_attention_of_the_window(store):
    q, k, _ = store.load("a").layer_qk(1)  # as stored (float16)
    dense = dense_attention(q, k, 2)
    window = data.attention_window(store, "a", 1, 2, 0, 40)
    assert window.pool == 1 and window.exact
    torch.testing.assert_close(window.matrix, dense, atol=1e-6, rtol=1e-5)
    window = data.attention_window(store, "a", 1, 2, 10, 20)
    torch.testing.assert_close(window.matrix, dense[10:30, 10:30], atol=1e-6, rtol=1e-5)
    window = data.attention_window(store, "a", 1, 2, 5, 30, max_cells=8)  # 4 x 4 blocks
    assert window.pool == 4 and window.matrix.shape == (8, 8)
    pooled = torch.nn.functional.avg_pool2d(dense[None, None, 5:35, 5:35], 4, ceil_mode=True)[0, 0]
    torch.testing.assert_close(window.matrix, pooled, atol=1e-6, rtol=1e-5)
    fig = figures.attention_heatmap(window, store.load("a").tokens)
    future = torch.ones_like(pooled, dtype=torch.bool).triu(1)  # blocks wholly after the rows
    np.testing.assert_allclose(fig.data[0].z, pooled.masked_fill(future, math.nan), atol=1e-6)
    assert list(fig.data[0].x[:2]) == [5, 9] and "4x4 blocks" in fig.layout.title.text
    assert data.clamp_window(40, 100, 5) == (39, 40) and data.clamp_window(40, -3, None) == (0, 40)


def test_heatmap_reads_kept_qk_of_the_loaded_run(store):
    loaded = data.load_run(store, "a")
    assert isinstance(loaded.qk, StoredQK) and attend.kept(loaded) == [1]
    q, k, attention = loaded.layer_qk(1)
    assert attention["scale"] == SCALE
    fig, msg = callbacks.heatmap_view(store, "a", {"layer": 1, "head": 3}, 0, 40, [], None)
    assert msg is None
    dense = dense_attention(q.float(), k.float(), 3)
    shown = dense.masked_fill(torch.ones_like(dense, dtype=torch.bool).triu(1), math.nan)
    np.testing.assert_allclose(fig.data[0].z, shown, atol=1e-6, rtol=1e-5)  # masked: NaN
    assert fig.data[0].text[5][2] == f"query 5 't5' -> key 2 't2': {dense[5, 2]:.4f}"
    assert fig.data[0].text[2][5] == "query 2 't2' -> key 5 't5': masked"
    assert "mass outside the window: 0.000" in fig.layout.title.text
    fig, _ = callbacks.heatmap_view(store, "a", {"layer": 1, "head": 3}, 20, 10, ["log"], None)
    window = dense[20:30, 20:30]
    outside = 1 - window.sum(1)
    assert f"mass outside the window: {outside.mean():.3f}" in fig.layout.title.text
    expected = torch.log10(window.clamp_min(1e-4)).masked_fill(
        torch.ones_like(window, dtype=torch.bool).triu(1), math.nan
    )
    np.testing.assert_allclose(fig.data[0].z, expected, atol=1e-5)
    fig, _ = callbacks.heatmap_view(store, "a", {"layer": 1, "head": 3}, 20, 10, ["renorm"], None)
    np.testing.assert_allclose(
        np.nansum(fig.data[0].z, 1), np.ones(10), atol=1e-5
    )  # rows sum to 1 inside the window
    fig, _ = callbacks.heatmap_view(store, "a", {"layer": 1, "head": 3}, 0, 10, ["nosink"], None)
    assert list(fig.data[0].x) == list(range(1, 10)) and "key 0 hidden" in fig.layout.title.text
    (store.root / "a" / QK_FILE).unlink()
    data.clear_caches()
    with pytest.raises(AttnscopeError, match=f"cannot read kept queries/keys from .*{QK_FILE}"):
        callbacks.heatmap_view(store, "a", {"layer": 1, "head": 3}, 0, 40, [], None)


def test_heatmap_pooling_bounds_the_matrix_and_samples_rows_beyond_budget(tmp_path):
    n = 700
    trace = random_trace(n=n, n_layers=1, qk_layers=(0,))
    trace.save(tmp_path / "long")
    store = RunStore(tmp_path)
    window = data.attention_window(store, "long", 0, 1, 0, n)
    assert window.exact and window.pool == 3 and window.matrix.shape == (234, 234)
    window = data.attention_window(store, "long", 0, 1, 0, n, max_cells=16, budget=16 * n * 4)
    assert (window.pool, window.sampled_rows, window.matrix.shape) == (44, 4, (16, 16))
    q, k, _ = store.load("long").layer_qk(0)  # as stored (float16)
    dense = dense_attention(q.float(), k.float(), 1)
    for i, j in [(0, 0), (5, 2), (15, 15)]:
        height = min(44, n - 44 * i)  # the last block is short
        picked = [44 * i + (2 * r + 1) * height // 8 for r in range(4)]  # 4 evenly spaced rows
        expected = dense[picked, 44 * j : 44 * (j + 1)].mean()
        torch.testing.assert_close(window.matrix[i, j], expected, atol=1e-6, rtol=1e-5)
    fig = figures.attention_heatmap(window, trace.tokens)
    assert "estimated from 4 of 44 evenly spaced query rows" in fig.layout.title.text


def test_heatmap_without_kept_qk_says_keep_qk(store):
    with pytest.raises(AttnscopeError, match=r"layer 0 \(kept: \[1\]\).*--keep-qk"):
        data.attention_window(store, "a", 0, 0, 0, 10)
    with pytest.raises(AttnscopeError, match=r"kept: none.*--keep-qk 2"):
        data.attention_window(store, "b", 2, 0, 0, 10)


def test_empty_root_newer_format_corrupt_files_and_escapes(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    store = RunStore(root)
    info, loaded, *_ = callbacks.run_view(store, None, None, None)
    assert loaded is None and "attnscope analyze --model" in info.children
    assert "--out root/demo" in info.children and str(tmp_path) not in info.children
    random_trace().save(root / "newer")
    header = json.loads((root / "newer" / "trace.json").read_text())
    (root / "newer" / "trace.json").write_text(json.dumps({**header, "format_version": 99}))
    with pytest.raises(AttnscopeError, match="newer attnscope"):
        callbacks.run_view(store, "newer", None, None)
    random_trace().save(root / "corrupt")
    (root / "corrupt" / "stats.parquet").write_bytes(b"not parquet")
    with pytest.raises(pa.ArrowInvalid) as err:
        callbacks.run_view(store, "corrupt", None, None)
    assert data.error_text(err.value).startswith("ArrowInvalid: ")
    random_trace().save(tmp_path / "outside")
    with pytest.raises(AttnscopeError, match="no run named"):
        callbacks.run_view(store, "../outside", None, None)
    (root / "bad").mkdir()
    (root / "bad" / "trace.json").write_text("{")
    random_trace().save(root / "ok")
    with pytest.warns(UserWarning) as caught:  # the other runs stay listed
        assert [r.name for r in data.list_runs(store)] == ["ok"]
    assert sorted(store.skipped) == ["bad", "corrupt", "newer"]
    assert "skipping run 'bad'" in " ".join(str(w.message) for w in caught)


def test_cli_dashboard_binds_loopback(tmp_path, monkeypatch, capsys):
    served = {}
    monkeypatch.setattr("dash.Dash.run", lambda app, **kw: served.update(kw))
    random_trace().save(tmp_path / "a")
    assert main(["dashboard", str(tmp_path)]) == 0
    assert served == {"host": "127.0.0.1", "port": 8050, "debug": False}
    assert "http://127.0.0.1:8050/" in capsys.readouterr().out
    assert main(["dashboard", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- (b) the app in a real browser -------------------------------------------------------------
@pytest.fixture
def dash_duo(dash_thread_server, tmp_path):
    """dash[testing]'s ``dash_duo`` on headless Debian Chromium (ENVIRONMENT.md flags)."""
    from dash.testing.composite import DashComposite
    from selenium.webdriver.chrome.options import Options

    options = Options()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    with DashComposite(
        server=dash_thread_server,
        browser="Chrome",
        headless=False,  # --headless=new is in the flags; dash would add the old --headless
        options=[options],
        download_path=str(tmp_path),
        percy_run=False,
    ) as duo:
        yield duo


@pytest.fixture(scope="module")
def model_runs(tmp_path_factory, cache_dir):
    """Runs of tiny-llama: ``alpha`` (analyze, no q/k), ``beta`` (q/k of layer 1), one written
    by a newer attnscope and one with a corrupt stats file."""
    root = tmp_path_factory.mktemp("runs")
    lm = asc.load("tiny-llama")
    asc.analyze(
        lm, "The cat sat on the mat because it was", generate=8, keep_qk=False, progress=False
    ).save(root / "alpha")
    ids = lm.tokenizer("Paris is the capital of France. The capital", return_tensors="pt").input_ids
    with torch.no_grad(), asc.capture(lm.model, keep_qk=[1], tokenizer=lm.tokenizer) as cap:
        lm.model.generate(ids, max_new_tokens=12, do_sample=False)
    beta = cap.trace
    beta.spans = {"prompt": (0, ids.shape[1]), "response": (ids.shape[1], len(beta))}
    beta.save(root / "beta")
    for name in ("newer", "broken"):
        shutil.copytree(root / "alpha", root / name)
    header = json.loads((root / "newer" / "trace.json").read_text())
    (root / "newer" / "trace.json").write_text(json.dumps({**header, "format_version": 99}))
    (root / "broken" / "stats.parquet").write_bytes(b"truncated")
    data.clear_caches()
    return root


def _plot(duo, graph_id: str, expr: str):
    """A property of the plotly figure inside dcc.Graph ``graph_id`` (JavaScript ``expr``)."""
    return duo.driver.execute_script(
        f"const gd = document.querySelector('#{graph_id} .js-plotly-plot'); return {expr};"
    )


def _z(duo, graph_id: str, trace: int = 0) -> np.ndarray:
    """The z matrix of a heatmap as plotted (NaN: a gap, such as a masked cell)."""
    expr = f"Array.from(gd._fullData[{trace}].z, r => Array.from(r, v => v === null ? NaN : v))"
    return np.array(_plot(duo, graph_id, expr), dtype=float)


def _wait_for_plot(duo, graph_id: str, title_part: str) -> None:
    duo.wait_for_contains_text(f"#{graph_id} .gtitle", title_part, timeout=15)


def _click_cell(duo, graph_id: str, fx: float, fy: float, subplot: int = 0) -> None:
    drag = duo.find_elements(f"#{graph_id} .nsewdrag")[subplot]
    duo.click_at_coord_fractions(drag, fx, fy)


def _shot(duo, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    duo.driver.save_screenshot(str(ARTIFACTS / f"dashboard-{name}.png"))


@pytest.mark.slow
@pytest.mark.browser
def test_explorer_in_the_browser(dash_duo, model_runs):
    duo = dash_duo
    store = RunStore(model_runs)
    duo.start_server(create_app(model_runs))
    duo.wait_for_contains_text("#run-info", "alpha: model tiny-llama", timeout=15)
    assert "kept no queries/keys" in duo.find_element("#run-info").text

    duo.select_dcc_dropdown("#run", index=1)  # beta
    duo.wait_for_contains_text("#run-info", "beta:", timeout=15)
    beta = store.load("beta")
    _wait_for_plot(duo, "strip", "entropy: mean over heads, all layers")
    strip = _plot(duo, "strip", "gd.data[0].z[0].length")
    assert strip == len(beta)

    _click_cell(duo, "strip", 15.5 / len(beta), 0.5)  # a token in the strip
    duo.wait_for_element("#token-title", timeout=15)
    position = int(re.match(r"token (\d+) ", duo.find_element("#token-title").text).group(1))
    assert abs(position - 15) <= 1
    cells = {
        row.find_elements("css selector", "td")[0].text: [
            td.text for td in row.find_elements("css selector", "td")
        ]
        for row in duo.find_elements("#token-table tr")[1:]
    }
    entropy = beta.rows["entropy"][..., position]
    assert cells["entropy"][2] == data.fmt(entropy.mean().item())
    assert cells["received"][2] == data.fmt(beta.cols["received"][..., position].mean().item())

    duo.select_dcc_dropdown("#metric", index=2)  # waad
    duo.select_dcc_dropdown("#layer", index=1)  # layer 0
    _wait_for_plot(duo, "strip", "waad: mean over heads, layer 0")
    shown = _plot(duo, "strip", "Array.from(gd._fullData[0].z[0])")
    np.testing.assert_allclose(shown, beta.rows["waad"][0].mean(0), rtol=1e-6)

    marked = sum(bool(groups) for layer in data.head_tags(beta) for groups in layer)
    shown_marks = duo.find_elements("#head-grid .textpoint text")
    assert len([m for m in shown_marks if m.text]) == 3 * marked  # the marks of beta, 3 panels
    _click_cell(duo, "head-grid", 3.5 / 4, 0.75)  # layer 0 (bottom row), head 3
    duo.wait_for_contains_text("#head-title", "layer 0 head 3", timeout=15)
    span = data.fmt(beta.head_span()[0, 3].item())
    assert f"head span {span}" in duo.find_element("#head-title").text
    duo.wait_for_contains_text("#heatmap-msg", "--keep-qk", timeout=15)

    _click_cell(duo, "head-grid", 2.5 / 4, 0.25)  # layer 1, head 2: its q/k were kept
    duo.wait_for_contains_text("#head-title", "layer 1 head 2", timeout=15)
    _wait_for_plot(duo, "heatmap", "layer 1 head 2")
    duo.find_element("#hm-options input[value='log']").click()  # linear scale
    until(lambda: "log scale" not in _plot(duo, "heatmap", "gd.layout.title.text"), 15)
    shown = _z(duo, "heatmap")
    window = data.attention_window(store, "beta", 1, 2, 0, None)
    expected = window.matrix.masked_fill(window.masked(), math.nan).numpy()
    np.testing.assert_allclose(shown, expected, atol=1e-6)
    _shot(duo, "beta")

    duo.clear_input("#hm-start")
    duo.find_element("#hm-start").send_keys("4\t")
    duo.clear_input("#hm-size")
    duo.find_element("#hm-size").send_keys("8\t")
    _wait_for_plot(duo, "heatmap", "tokens 4-11")
    shown = _z(duo, "heatmap")
    window = data.attention_window(store, "beta", 1, 2, 4, 8)
    np.testing.assert_allclose(
        shown, window.matrix.masked_fill(window.masked(), math.nan), atol=1e-6
    )

    duo.select_dcc_dropdown("#compare", index=0)  # alpha next to beta
    duo.wait_for_element("#layer-means .trace:nth-of-type(2)", timeout=15)
    assert _plot(duo, "layer-means", "gd.data.map(t => t.name)") == ["beta", "alpha"]

    duo.select_dcc_dropdown("#head-score", index=2)  # overview, receiver, sink, span
    _wait_for_plot(duo, "head-grid", "Heads coloured by first-token sink")
    np.testing.assert_allclose(_z(duo, "head-grid"), beta.cols["sink_score"][..., 0], rtol=1e-6)
    until(lambda: "score=sink" in duo.driver.current_url, 10)
    _click_cell(duo, "head-grid", 1.5 / 4, 0.75)  # a click still selects: layer 0, head 1
    duo.wait_for_contains_text("#head-title", "layer 0 head 1", timeout=15)
    duo.driver.get(f"{duo.server_url}/?run=beta&layer=1&head=2&score=span")  # a linked view
    _wait_for_plot(duo, "head-grid", "Heads coloured by head span")
    np.testing.assert_allclose(_z(duo, "head-grid"), beta.head_span(), rtol=1e-6)
    assert duo.find_element("#head-score").text == "head span"

    skipped = duo.find_element("#skipped").text  # not in the run list: named, with why
    assert "skipped run 'newer': written by a newer attnscope" in skipped
    assert "skipped run 'broken': stats.parquet is damaged" in skipped
    assert str(model_runs) not in skipped
    _shot(duo, "broken")
    assert not duo.get_logs(), duo.get_logs()


@pytest.mark.slow
@pytest.mark.browser
def test_explorer_with_no_runs(dash_duo, tmp_path):
    (tmp_path / "empty").mkdir()
    dash_duo.start_server(create_app(tmp_path / "empty"))
    dash_duo.wait_for_contains_text("#run-info", "No runs under", timeout=15)
    assert "attnscope analyze" in dash_duo.find_element("#run-info").text
    _shot(dash_duo, "empty")
