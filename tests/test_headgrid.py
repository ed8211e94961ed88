"""Heads coloured by any head score (attnscope.headgrid): the report's score menu, the explorer's
"colour heads by" dropdown and its URL state, against scores from eager attentions."""

import re

import flask
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from head_reference import tl_scores
from reference import eager_attentions
from test_report_panels import synthetic_trace

import attnscope as asc
from attnscope.dashboard import callbacks, data, figures, layout
from attnscope.errors import AttnscopeError
from attnscope.headgrid import score_grid, trace_scores
from attnscope.headtable import DETECTORS, head_scores, score_table, score_title
from attnscope.report import write_report
from attnscope.runfiles import HEADS_FILE
from attnscope.store import RunStore
from attnscope.trace import Trace


@pytest.fixture(scope="module")
def tiny(cache_dir):
    """A tiny-llama trace of few distinct tokens (many copies), its eager attentions ``[L, H, T,
    T]`` and token ids."""
    lm = asc.load("tiny-llama")
    ids = torch.randint(5, 14, (1, 30), generator=torch.Generator().manual_seed(3))
    metrics = (*DETECTORS, "fai", "sink_score", "mean_distance", "entropy")
    with torch.no_grad(), asc.capture(lm.model, metrics=metrics, tokenizer=lm.tokenizer) as cap:
        lm.model(input_ids=ids)
    attn = torch.stack(eager_attentions(lm.model, input_ids=ids))[:, 0]
    return cap.trace, attn, ids[0].tolist()


def _grid(values: dict, n_layers: int, n_heads: int) -> np.ndarray:
    return np.array([[values[li, h] for h in range(n_heads)] for li in range(n_layers)])


def test_score_grid_draws_every_score_with_a_menu(tiny):
    trace, attn, ids = tiny
    n_l, n_h = attn.shape[:2]
    ref = {(li, h): tl_scores(attn[li, h], ids) for li in range(n_l) for h in range(n_h)}
    fig = score_grid(trace)
    names = [t.name for t in fig.data]
    assert names == [
        "induction",
        "induction_abs",
        "prev_token",
        "prev_token_abs",
        "duplicate_token",
        "duplicate_token_abs",
        "receiver",
        "sink",
        "span",
    ]
    by_name = {t.name: t for t in fig.data}
    for name in DETECTORS:  # TransformerLens detect_head, mul and abs, from eager attentions
        for col, suffix in enumerate(("", "_abs")):
            expected = _grid({k: v[name][col] for k, v in ref.items()}, n_l, n_h)
            np.testing.assert_allclose(by_name[name + suffix].z, expected, atol=2e-5)
    np.testing.assert_allclose(by_name["sink"].z, trace.cols["sink_score"][..., 0], rtol=1e-6)
    np.testing.assert_allclose(by_name["span"].z, trace.head_span(), rtol=1e-6)
    assert [t.visible for t in fig.data] == [True] + [False] * (len(names) - 1)
    assert fig.layout.title.text == "Heads coloured by induction"
    assert (by_name["induction"].zmin, by_name["induction"].zmax) == (0, 1)  # a share: 0..1
    assert by_name["induction_abs"].zmin is None  # abs scores go below 0
    menu = fig.layout.updatemenus[0]
    assert [b.label for b in menu.buttons] == [score_title(n) for n in names]
    assert menu.buttons[2].label == "previous-token" and menu.buttons[1].label == "induction (abs)"
    for i, button in enumerate(menu.buttons):
        assert button.args[0]["visible"] == [j == i for j in range(len(names))]
        assert button.args[1]["title.text"] == f"Heads coloured by {score_title(names[i])}"
    labels = trace.heads()["label"].to_pylist()
    assert [list(r) for r in by_name["sink"].customdata] == [
        labels[li * n_h : (li + 1) * n_h] for li in range(n_l)
    ]
    named = ["none" if label == "-" else label for label in labels]
    subtitle = ", ".join(f"{k} {named.count(k)}" for k in sorted(set(named)))
    assert fig.layout.title.subtitle.text == f"labels: {subtitle}"
    assert by_name["sink"].texttemplate == "%{z:.2f}"  # 8 heads: values in the cells
    hover = by_name["prev_token_abs"].hovertemplate
    assert "previous-token (abs) = %{z:.3f}" in hover and "label: %{customdata}" in hover
    assert list(by_name["span"].y) == [f"L{i}" for i in trace.layers]
    assert list(by_name["span"].x) == [f"h{h}" for h in range(n_h)]
    assert fig.layout.yaxis.autorange == "reversed"  # layer 0 at the top, as in the report

    one = score_grid(trace, "prev_token", menu=False)  # only the chosen score, no menu
    assert len(one.data) == 1 and not one.layout.updatemenus
    expected = _grid({k: v["prev_token"][0] for k, v in ref.items()}, n_l, n_h)
    np.testing.assert_allclose(one.data[0].z, expected, atol=2e-5)
    with pytest.raises(AttnscopeError, match="no head score 'retrieval'"):
        score_grid(trace, "retrieval")


def test_scores_follow_the_attention_kind():
    causal = synthetic_trace(3)
    assert list(trace_scores(causal)) == ["receiver", "sink", "span"]
    encoder = synthetic_trace(3, kind="bidirectional")  # FAI, hence receiver, is causal-only
    assert list(trace_scores(encoder)) == ["sink", "span"]
    torch.testing.assert_close(trace_scores(encoder)["span"], encoder.head_span().double())
    encoder.rows["mean_distance"] -= 3  # signed distances of an older encoder run: no span
    assert list(trace_scores(encoder)) == ["sink"]
    cross = synthetic_trace(3, kind="cross")  # keys are audio frames: no span
    assert list(trace_scores(cross)) == ["sink"]
    bare = synthetic_trace(3)
    bare.rows, bare.cols = {"entropy": bare.rows["entropy"]}, {}
    with pytest.raises(AttnscopeError, match="no metric that gives a head score"):
        score_grid(bare)


@pytest.fixture
def heads_run(tiny, tmp_path):
    """A run directory like ``attnscope heads --out`` writes: the trace and a head table with
    scores the trace cannot give (random-token induction, retrieval) and a sink that wins, its
    rows shuffled; returns the root, the trace and the table's scores."""
    trace = tiny[0]
    trace.save(tmp_path / "run")
    g = torch.Generator().manual_seed(7)
    shape = (len(trace.layers), trace.n_heads)
    stored = {
        **head_scores(trace),
        "induction_random": torch.rand(shape, generator=g, dtype=torch.float64),
        "retrieval": torch.rand(shape, generator=g, dtype=torch.float64),
        "sink": torch.rand(shape, generator=g, dtype=torch.float64),
    }
    table = score_table(trace.layers, stored)
    order = torch.randperm(table.num_rows, generator=g).tolist()
    pq.write_table(table.take(order), tmp_path / "run" / HEADS_FILE)
    data.clear_caches()
    return tmp_path, Trace.load(tmp_path / "run"), stored


def test_a_runs_head_table_adds_its_scores(heads_run):
    root, trace, stored = heads_run
    scores = trace_scores(trace, root / "run")
    assert list(scores)[:2] == ["induction_random", "induction"]
    assert {"retrieval", "receiver", "span"} <= set(scores)
    for name in ("induction_random", "retrieval", "sink"):  # the table's values, in place
        torch.testing.assert_close(scores[name], stored[name])
    torch.testing.assert_close(scores["span"], trace.head_span().double())
    page = write_report(trace, root / "run").read_text()
    assert page.count("plotly-graph-div") == 3  # strip, head maps, head scores (no q/k)
    assert re.search(r'"label": ?"induction \(random tokens\)"', page)  # a menu button


def test_dashboard_colours_heads_by_the_chosen_score(heads_run):
    root, trace, stored = heads_run
    store = RunStore(root)
    scores = trace_scores(trace, root / "run")
    options, value = callbacks.score_view(store, "run", None, None)
    assert [o["value"] for o in options] == [callbacks.OVERVIEW, *scores]
    assert [o["label"] for o in options][1:] == [score_title(s) for s in scores]
    assert options[0]["label"] == "overview: head span, mean entropy, sink score of token 0"
    assert value == callbacks.OVERVIEW
    wanted = {"run": "run", "score": "prev_token"}
    assert callbacks.score_view(store, "run", None, wanted)[1] == "prev_token"
    assert callbacks.score_view(store, "run", "retrieval", wanted)[1] == "retrieval"  # kept
    assert callbacks.score_view(store, "run", None, {"run": "run", "score": "nope"})[1] == (
        callbacks.OVERVIEW
    )
    assert callbacks.score_view(store, "run", None, {"run": "b", "score": "sink"})[1] == (
        callbacks.OVERVIEW
    )

    head = {"layer": trace.layers[1], "head": 2}
    fig, _ = callbacks.head_grid_view(store, "run", head, "induction_random")
    assert len(fig.data) == 1
    np.testing.assert_allclose(fig.data[0].z, stored["induction_random"])
    assert fig.layout.title.text == "Heads coloured by induction (random tokens)"
    assert fig.layout.title.subtitle.text.endswith("; click a head")
    assert fig.layout.yaxis.autorange is True  # layer 0 at the bottom, as the overview
    (box,) = fig.layout.shapes  # the selected head outlined: head 2 of the second layer
    assert (box.x0, box.x1, box.y0, box.y1) == (1.5, 2.5, 0.5, 1.5)
    overview, _ = callbacks.head_grid_view(store, "run", head, callbacks.OVERVIEW)
    np.testing.assert_allclose(overview.data[0].z, trace.head_span(), rtol=1e-6)
    assert len(overview.data) == len(figures.head_grid(trace, head).data)

    search = callbacks._url(store, "run", head, 5, "induction_random")
    assert callbacks._url(store, "run", head, 5, callbacks.OVERVIEW) == search.split("&score")[0]
    with flask.Flask(__name__).test_request_context(headers={"Referer": "http://h/" + search}):
        wanted = layout.wanted_state()
    assert wanted == {
        "run": "run",
        "layer": head["layer"],
        "head": 2,
        "token": 5,
        "score": "induction_random",
    }
    assert callbacks.score_view(store, "run", None, wanted)[1] == "induction_random"
