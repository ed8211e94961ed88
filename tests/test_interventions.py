"""Interventions change exactly the intended pre-softmax scores (checked against a hand-computed
edit on the dense path and against eager attentions), nothing when they are zero, and leave the
model untouched after exit."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from reference import assert_trace_matches
from test_vlm import full_sequence_inputs

import attnscope as asc
from attnscope.cli import main
from attnscope.errors import AttnscopeError
from attnscope.interventions import (
    SinkSuppression,
    VisualBoost,
    carve,
    detect_sinks,
    select_tokens,
)
from attnscope.interventions.carve import connected_components, region_mask
from attnscope.probes import interface
from attnscope.probes.interface import all_configs
from attnscope.probes.session import ProbeSession
from attnscope.vlm import analyze_image, prepare
from attnscope.vlm.layout import ImageLayout, ImageSpan, family_of

MODELS = ["tiny-llava", "tiny-qwen2-vl"]
PROMPT = "What is in the picture?"


@pytest.fixture(scope="module", params=MODELS)
def lm(request, cache_dir):
    return asc.load(request.param)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    image = Image.new("RGB", (112, 84), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, 50, 50), fill="red")
    draw.ellipse((60, 30, 105, 75), fill="blue")
    path = tmp_path_factory.mktemp("img") / "scene.png"
    image.save(path)
    return path


@pytest.fixture(scope="module")
def inputs(lm, scene):
    return prepare(lm, scene, PROMPT)


def eager_run(model, tensors, session=None):
    """Eager forward (attentions returned), inside ``session`` when given."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), session or torch.no_grad():
            return model(**tensors, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")


def vision_scores(lm, tensors, layout, layer):
    """Class-token attention (LLaVA) / mean received attention (Qwen2-VL) per LLM image token,
    from dense softmax of the vision tower's queries and keys."""
    family = family_of(lm.model.config)
    probe = ProbeSession.of(lm.model)
    n_vision = len(probe.layers("vision"))
    target = family.vision_stack.format(layer % n_vision)
    kept = []

    def keep(call):
        if call.site.name == target:
            scores = call.query @ call.key.transpose(-1, -2) * call.kwargs["scaling"]
            kept.append(torch.softmax(scores, -1))  # [B, H, n, n]

    with torch.no_grad(), probe.attached(observer=keep), asc.capture(lm.model):
        lm.model(**tensors)
    if family.class_token:
        per_token = torch.cat(kept)[:, :, 0].mean(1)  # [B, n]
    else:
        per_token = torch.cat([p.mean(2).mean(1)[0] for p in kept])[None]  # [1, N]
    span = layout.images[0]
    return per_token[span.vision_batch][span.vision_tokens()].mean(-1)


def layer0_scores(trace):
    """Scaled scores ``[H, T, T]`` of layer 0 from the kept queries and keys (dense path)."""
    q, k = trace.qk[0]
    k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
    return q @ k.transpose(-1, -2) * trace.meta["qk_attention"]["0"]["scale"]


def test_boost_edits_exactly_the_intended_scores(lm, inputs):
    model, tensors, layout = lm.model, inputs.tensors, inputs.layout
    boost = VisualBoost(alpha=0.7, beta=0.3, start=0, end=1)
    with (
        torch.no_grad(),
        boost.applied(model, layout) as session,
        asc.capture(model, keep_qk=[0], spans=layout.spans) as cap,
    ):
        logits = model(**tensors).logits
    local, summary = session.state["local"], session.state["summary"]
    # the tokens PAINT picks, from dense vision-tower attentions
    ref_local, ref_summary = select_tokens(
        vision_scores(lm, tensors, layout, 0), vision_scores(lm, tensors, layout, -2), 0.25
    )
    start = layout.images[0].start
    assert torch.equal(local, start + ref_local) and torch.equal(summary, start + ref_summary)
    assert len(local) > 0

    # hand-computed edit of the last row's pre-softmax scores, dense path
    trace = cap.traces("model.language_model.layers.{}.self_attn")[0]
    row = layer0_scores(trace)[:, -1].clone()  # [H, T], the last row sees every key
    row[:, local] += 0.7 * row[:, local].abs()
    row[:, summary] += 0.3 * row[:, summary].abs()
    expected = torch.softmax(row, -1)

    plain = eager_run(model, tensors)
    edited = eager_run(model, tensors, boost.applied(model, layout))
    torch.testing.assert_close(edited.attentions[0][0, :, -1], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(edited.attentions[0][0, :, :-1], plain.attentions[0][0, :, :-1])
    assert not torch.allclose(edited.attentions[0][0, :, -1], plain.attentions[0][0, :, -1])
    # SDPA took the same edit, and the capture of the same run measured it, edited layer included
    torch.testing.assert_close(logits, edited.logits, atol=1e-5, rtol=1e-5)
    assert_trace_matches(trace, torch.stack(edited.attentions)[:, 0])
    image = layout.positions
    torch.testing.assert_close(
        trace.rows["span_mass:image:0"][:, :, -1],
        torch.stack(edited.attentions)[:, 0, :, -1, image].sum(-1),
        atol=1e-5,
        rtol=1e-5,
    )
    # records: the direct effect on the edited row
    (record,) = [r for r in session.records if r.layer == 0]
    torch.testing.assert_close(record.before[0], plain.attentions[0][0, :, -1, image].sum(-1))
    torch.testing.assert_close(record.after[0], expected[:, image].sum(-1))


def test_head_selective_boost_edits_chosen_heads_only(lm, inputs):
    model, tensors, layout = lm.model, inputs.tensors, inputs.layout
    heads = {0: torch.tensor([False, True, False, False])}
    boost = VisualBoost(alpha=2.0, beta=1.0, start=0, end=2, heads=heads)
    plain = eager_run(model, tensors)
    edited = eager_run(model, tensors, boost.applied(model, layout))
    before, after = plain.attentions[0][0, :, -1], edited.attentions[0][0, :, -1]  # [H, T]
    assert not torch.allclose(before[1], after[1])
    torch.testing.assert_close(after[[0, 2, 3]], before[[0, 2, 3]])
    # layer 1 is in range but has no chosen head: its scores are not edited
    with torch.no_grad(), boost.applied(model, layout) as session:
        model(**tensors)
    assert {r.layer for r in session.records} == {0}


def test_zero_boost_changes_nothing_and_model_is_untouched(lm, inputs):
    model, tensors, layout = lm.model, inputs.tensors, inputs.layout
    before_impl = {id(c): c._attn_implementation_internal for c in all_configs(model)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(**tensors).logits
        with VisualBoost(alpha=0.0, beta=0.0, start=0).applied(model, layout) as session:
            zero = model(**tensors).logits
        assert session.records == []
        assert torch.equal(plain, zero)
        with VisualBoost(alpha=3.0, start=0).applied(model, layout):
            boosted = model(**tensors).logits
            again = model(**tensors).logits  # a new sequence: positions count from 0 again
        assert not torch.equal(plain, boosted) and torch.equal(boosted, again)
        with (
            pytest.raises(RuntimeError, match="boom"),
            SinkSuppression(tokens=[layout.images[0].start]).applied(model, layout),
        ):
            raise RuntimeError("boom")
        after = model(**tensors).logits
    assert torch.equal(plain, after)
    assert {id(c): c._attn_implementation_internal for c in all_configs(model)} == before_impl
    probe = ProbeSession.of(model)
    assert probe.editors == [] and probe.observers == []
    assert not any(interface.watching.get(m) for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_sink_suppression_removes_or_redirects_the_share(lm, inputs):
    model, tensors, layout = lm.model, inputs.tensors, inputs.layout
    span = layout.images[0]
    sinks, targets = [span.start, span.start + 2], [span.start + 1, span.start + 3]
    plain = eager_run(model, tensors).attentions[0][0, :, -1]  # [H, T]
    removed = plain.clone()
    removed[:, sinks] = 0
    removed /= removed.sum(-1, keepdim=True)
    edit = SinkSuppression(tokens=sinks, end=1)
    with asc.capture(model, spans=layout.spans) as cap:
        got = eager_run(model, tensors, edit.applied(model, layout)).attentions[0][0, :, -1]
    torch.testing.assert_close(got, removed, atol=1e-6, rtol=1e-5)
    trace = cap.traces("model.language_model.layers.{}.self_attn")[0]
    torch.testing.assert_close(
        trace.rows["span_mass:image:0"][0, :, -1], removed[:, span.start : span.end].sum(-1)
    )
    moved = plain[:, sinks].sum(-1, keepdim=True)
    kept = plain[:, targets].sum(-1, keepdim=True)
    redirected = plain.clone()
    redirected[:, sinks] = 0
    redirected[:, targets] *= 1 + moved / kept
    edit = SinkSuppression(tokens=sinks, redirect_to=targets, end=1)
    got = eager_run(model, tensors, edit.applied(model, layout)).attentions[0][0, :, -1]
    torch.testing.assert_close(got, redirected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[0]))


def test_interventions_compose(lm, inputs):
    """Two edits at once: the second sees the first one's scores (sinks removed, then boosted)."""
    model, tensors, layout = lm.model, inputs.tensors, inputs.layout
    boost = VisualBoost(alpha=1.5, beta=0.5, start=0, end=1)
    with (
        torch.no_grad(),
        boost.applied(model, layout) as session,
        asc.capture(model, keep_qk=[0]) as cap,
    ):
        model(**tensors)
    local, summary = session.state["local"], session.state["summary"]
    sinks = [int(local[0]), layout.images[0].start + 5]
    row = layer0_scores(cap.traces("model.language_model.layers.{}.self_attn")[0])[:, -1]
    row = row.clone()
    row[:, local] += 1.5 * row[:, local].abs()
    row[:, summary] += 0.5 * row[:, summary].abs()
    row[:, sinks] = float("-inf")  # removed keys take no boost
    sink_edit = SinkSuppression(tokens=sinks, end=1).applied(model, layout)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), sink_edit, boost.applied(model, layout):
            got = model(**tensors, output_attentions=True).attentions[0][0, :, -1]
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(got, torch.softmax(row, -1), atol=1e-6, rtol=1e-5)
    assert (got[:, sinks] == 0).all()


def test_detect_sinks_and_boost_during_generation(lm, scene):
    trace = analyze_image(lm, scene, PROMPT, generate=3, progress=False)
    span = trace.meta["images"][0]
    found = detect_sinks(trace, factor=1.2, min_fraction=0.5)
    assert found and all(span["start"] <= s < span["end"] for s in found)
    boosted = analyze_image(
        lm, scene, PROMPT, generate=3, progress=False, intervention=VisualBoost(alpha=1.0, start=0)
    )
    meta = boosted.meta["intervention"]
    assert meta["name"] == "VisualBoost" and meta["start"] == 0
    assert meta["edited_rows"] == 2 * 4  # 2 layers x (prefill + 2 decode steps + last token)
    assert all(meta["mass_after"][k] > meta["mass_before"][k] for k in ("0", "1"))


def test_boosted_generation_is_the_same_on_sdpa_and_eager(lm, inputs):
    """Decode steps (one query row, grouped KV heads packed by SDPA) take the same edit."""
    model = lm.model

    def generate(impl, edit):
        model.set_attn_implementation(impl)
        try:
            with torch.no_grad(), edit.applied(model, inputs.layout):
                return model.generate(
                    **inputs.tensors,
                    max_new_tokens=4,
                    do_sample=False,
                    output_scores=True,
                    return_dict_in_generate=True,
                    suppress_tokens=[model.config.image_token_id],
                )
        finally:
            model.set_attn_implementation("sdpa")

    boost = VisualBoost(alpha=4.0, beta=2.0, start=0)
    sdpa, eager = generate("sdpa", boost), generate("eager", boost)
    plain = generate("sdpa", VisualBoost(alpha=0.0, beta=0.0, start=0))
    assert torch.equal(sdpa.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(sdpa.scores), torch.stack(eager.scores))
    assert not torch.allclose(torch.stack(sdpa.scores)[1:], torch.stack(plain.scores)[1:])


def test_layer_ranges_outside_the_model_are_refused(lm, inputs):
    with pytest.raises(AttnscopeError, match=r"layers \[0, 5\) outside the model's 2 decoder"):
        VisualBoost(start=0, end=5).applied(lm.model, inputs.layout)
    with pytest.raises(AttnscopeError, match=r"layers \[2, 2\) outside"):
        VisualBoost().applied(lm.model, inputs.layout)  # PAINT's default start 2
    with pytest.raises(ValueError, match="empty or negative"):
        VisualBoost(start=-1)
    with pytest.raises(ValueError, match="empty or negative"):
        SinkSuppression(tokens=[1], start=1, end=1)
    with (
        pytest.raises(AttnscopeError, match=r"vision layer 7 outside"),
        VisualBoost(start=0, local_layer=7).applied(lm.model, inputs.layout),
    ):
        pass
    with pytest.raises(AttnscopeError, match=r"CARVE layers \[1, 3\) outside"):
        carve(lm, inputs.images[0], PROMPT, layers=(1, 3))


def test_carve_contrast_mask_and_reask(lm, scene):
    result = carve(lm, scene, PROMPT, steps=3, generate=4, top_p=0.25, top_k=1)
    general = analyze_image(
        lm, scene, "Write a general description of the image.", generate=3, progress=False
    )
    maps = []
    for trace in (result.trace, general):
        inputs = prepare(lm, scene, trace.meta["text"])
        tensors = full_sequence_inputs(lm, inputs, trace)
        attn = torch.stack(eager_run(lm.model, tensors).attentions)[:, 0]  # [L, H, T, T]
        first = trace.spans["prompt"][1] - 1  # rows of the first 3 answer tokens
        a = attn[:, :, first : first + 3][..., inputs.layout.positions].mean((1, 2))  # [L, N]
        maps.append(a / a.mean(-1, keepdim=True))
    expected = (maps[0] / (maps[1] + 1.0)).mean(0)
    span = ImageLayout.of(result.trace).images[0]
    torch.testing.assert_close(result.contrast, span.to_grid(expected), atol=1e-5, rtol=1e-4)
    mask = result.mask
    assert mask.shape == (84, 112) and mask.any() and not mask.all()
    pixels = np.asarray(result.masked)
    assert (pixels[~mask] == 0).all()
    assert (pixels[mask] == np.asarray(Image.open(scene).convert("RGB"))[mask]).all()
    ys, xs = mask.nonzero()
    assert result.cropped.size == (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    assert (
        isinstance(result.answer, str)
        and result.original_answer == result.trace.meta["generated_text"]
    )


def test_region_mask_keeps_top_pixels_and_regions():
    grid = torch.zeros(4, 6)
    grid[0:2, 0:2] = 1.0  # a strong blob
    grid[3, 4:6] = 0.8  # a weaker one
    span = ImageSpan("image:0", 0, 24, 4, 6, (0.0, 0.0, 60.0, 40.0), (60, 40), 0, 0, 1)
    both = region_mask(grid, span, top_p=0.3, top_k=2)
    one = region_mask(grid, span, top_p=0.3, top_k=1)
    assert both.shape == (40, 60)
    assert one[:20, :20].any() and not one[30:, 40:].any()
    assert both[30:, 40:].any() and both.sum() > one.sum()
    assert both.mean() <= 0.3 + 1e-9
    labels = connected_components(torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 1]]) > 0)
    assert len(torch.unique(labels[labels > 0])) == 2
    assert labels[0, 0] == labels[1, 1] and labels[1, 3] == labels[2, 3] != labels[0, 0]


def test_select_tokens_by_hand():
    local_score = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.05])
    summary_score = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 5.0])
    local, summary = select_tokens(local_score, summary_score, 0.5)
    assert summary.tolist() == [7]
    assert local.tolist() == [0, 2, 4, 6]
    local, _ = select_tokens(local_score, torch.tensor([5.0, *[0.1] * 7]), 0.5)
    assert local.tolist() == [2, 4, 6]  # token 0 is a summary token: boosted as summary only


def test_cli_boost_and_carve_runs(lm, scene, tmp_path, capsys):
    common = [str(scene), "--model", lm.name, "--generate", "3", "--layers", "0:2"]
    assert main(["vlm", *common, "--intervene", "boost", "--out", str(tmp_path / "b")]) == 0
    trace = asc.Trace.load(tmp_path / "b")
    assert trace.meta["intervention"]["name"] == "VisualBoost"
    assert "generated_text" in trace.meta["baseline"]
    assert "edited rows, visual mass before -> after: L0:" in capsys.readouterr().out
    assert main(["vlm", *common, "--intervene", "carve", "--out", str(tmp_path / "c")]) == 0
    mask = np.asarray(Image.open(tmp_path / "c" / "mask.png"))
    assert mask.shape == (84, 112) and mask.any()
    assert (tmp_path / "c" / "masked.png").is_file() and (tmp_path / "c" / "cropped.png").is_file()
    assert "carve_answer" in capsys.readouterr().out
    bad = [
        "vlm",
        str(scene),
        "--model",
        lm.name,
        "--intervene",
        "boost",
        "--out",
        str(tmp_path / "x"),
    ]
    assert main(bad) == 2  # PAINT's default start 2 is outside the tiny model
    assert "outside the model's 2 decoder layers" in capsys.readouterr().err
