"""attention_stats: the chunked backend against the dense reference, and input errors."""

import math

import pytest
import torch

from attnscope import kernels, metrics
from attnscope.errors import ShapeError, UnsupportedMetricError
from attnscope.kernels.chunked import chunked_stats
from attnscope.kernels.request import build_request

ATOL = 1e-5
RTOL = 1e-5


def assert_same_stats(a: kernels.AttentionStats, b: kernels.AttentionStats) -> None:
    assert a.rows.keys() == b.rows.keys() and a.col_sums.keys() == b.col_sums.keys()
    for name in a.rows:
        torch.testing.assert_close(
            a.rows[name],
            b.rows[name],
            atol=ATOL,
            rtol=RTOL,
            equal_nan=True,
            msg=lambda m, n=name: f"row {n}: {m}",
        )
    ca, cb = a.cols, b.cols
    for name in ca:
        torch.testing.assert_close(
            ca[name],
            cb[name],
            atol=ATOL,
            rtol=RTOL,
            equal_nan=True,
            msg=lambda m, n=name: f"col {n}: {m}",
        )
    torch.testing.assert_close(a.lse, b.lse, atol=ATOL, rtol=RTOL, equal_nan=True)


CASES = [
    dict(b=1, hq=2, hkv=2, tq=1, tk=1, d=8),
    dict(b=2, hq=4, hkv=1, tq=37, tk=37, d=16),  # GQA 4:1, odd length
    dict(b=1, hq=4, hkv=2, tq=129, tk=129, d=12, sliding_window=17),  # head dim not a power of 2
    dict(b=2, hq=2, hkv=1, tq=50, tk=50, d=8, softcap=5.0),
    dict(b=1, hq=3, hkv=3, tq=7, tk=61, d=8, causal=False),  # cross-attention, Lq != Lk
    dict(b=1, hq=2, hkv=1, tq=5, tk=40, d=8),  # decode-style: a few rows at the end
    dict(
        b=2,
        hq=2,
        hkv=2,
        tq=64,
        tk=64,
        d=8,
        spans={"img": (3, 20), "tail": (60, 64)},
        fai_horizon=(2, 7),
        fai_rows=(30, 64),
        sink_tokens=4,
        window=3,
    ),
    dict(b=1, hq=2, hkv=1, tq=33, tk=33, d=8, fai_horizon=None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("block_elements", [64, 1 << 22])
def test_chunked_equals_dense(case, block_elements):
    case = dict(case)
    b, hq, hkv, tq, tk, d = (case.pop(k) for k in ("b", "hq", "hkv", "tq", "tk", "d"))
    q, k = torch.randn(b, hq, tq, d) * 2, torch.randn(b, hkv, tk, d) * 2
    req = build_request(q, k, **case)
    dense = kernels.attention_stats(q, k, backend="dense", **case)
    assert_same_stats(dense, chunked_stats(req, block_elements=block_elements))


def test_dense_backend_matches_reference_metrics_on_probabilities():
    q, k = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    attn = torch.softmax(
        (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(
            ~torch.ones(30, 30, dtype=torch.bool).tril(), float("-inf")
        ),
        -1,
    )
    st = kernels.attention_stats(q, k, backend="chunked", fai_horizon=(3, 9))
    torch.testing.assert_close(st.rows["entropy"], metrics.entropy(attn), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(st.rows["waad"], metrics.waad(attn), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(
        st.cols["fai"], metrics.fai(attn, horizon=(3, 9)), atol=ATOL, rtol=RTOL, equal_nan=True
    )
    torch.testing.assert_close(
        st.cols["sink_score"], metrics.sink_score(attn), atol=ATOL, rtol=RTOL
    )


def test_padding_mask_gives_unpadded_positions_and_nan_rows():
    """Left padding: pad rows are NaN, real rows match the unpadded sequence exactly."""
    q, k = torch.randn(2, 2, 20, 8), torch.randn(2, 1, 20, 8)
    key_valid = torch.ones(2, 20, dtype=torch.bool)
    key_valid[1, :6] = False
    padded = kernels.attention_stats(q, k, mask=key_valid, fai_horizon=(1, 4), sink_tokens=2)
    alone = kernels.attention_stats(q[1:, :, 6:], k[1:, :, 6:], fai_horizon=(1, 4), sink_tokens=2)
    assert padded.rows["entropy"][1, :, :6].isnan().all()
    for name in padded.rows:
        torch.testing.assert_close(
            padded.rows[name][1:, :, 6:], alone.rows[name], atol=ATOL, rtol=RTOL
        )
    for name, col in padded.cols.items():
        torch.testing.assert_close(
            col[1:, :, 6:], alone.cols[name], atol=ATOL, rtol=RTOL, equal_nan=True
        )


def test_full_mask_and_fully_masked_rows():
    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    mask[0, 0, 3] = False  # row 3 sees nothing
    for backend in ("dense", "chunked"):
        st = kernels.attention_stats(q, k, mask=mask, backend=backend)
        assert st.rows["entropy"][0, :, 3].isnan().all()
        assert not st.rows["entropy"][0, :, [0, 1, 2, 4, 5]].isnan().any()
        assert not st.cols["received"].isnan().any()


def test_column_sums_add_up_across_calls():
    """Statistics of rows 0..19 then 20..29 add up to those of one call (the generate() case)."""
    q, k = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    whole = kernels.attention_stats(q, k, fai_horizon=(2, 12))
    first = kernels.attention_stats(q[:, :, :20], k[:, :, :20], fai_horizon=(2, 12))
    second = kernels.attention_stats(q[:, :, 20:], k, fai_horizon=(2, 12))
    for name in whole.col_sums:
        total = second.col_sums[name].clone()
        total[..., :20] += first.col_sums[name]
        torch.testing.assert_close(total, whole.col_sums[name], atol=ATOL, rtol=RTOL)


def test_metric_subset():
    q, k = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    st = kernels.attention_stats(q, k, metrics=["waad", "fai"])
    assert list(st.rows) == ["waad"] and list(st.cols) == ["fai"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(k=torch.randn(1, 3, 5, 4)), ShapeError, "multiple of key/value heads"),
        (dict(k=torch.randn(1, 2, 5, 6)), ShapeError, "share batch and head dim"),
        (dict(q=torch.randn(2, 5, 4)), ShapeError, "4-D"),
        (dict(window=0), ValueError, "window"),
        (dict(fai_horizon=(9, 3)), ValueError, "horizon"),
        (dict(metrics=["entropy", "bogus"]), UnsupportedMetricError, "bogus"),
        (dict(backend="cuda-magic"), UnsupportedMetricError, "unknown backend"),
        (dict(mask=torch.ones(1, 3, dtype=torch.bool)), ShapeError, "mask"),
        (dict(sliding_window=0), ValueError, "sliding_window"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    args = dict(q=torch.randn(1, 4, 5, 4), k=torch.randn(1, 2, 5, 4)) | kwargs
    with pytest.raises(error, match=match):
        kernels.attention_stats(args.pop("q"), args.pop("k"), **args)


def test_chunked_memory_is_blockwise():
    """The chunked backend never allocates a [B, H, T, T] tensor (checked by block size)."""
    q, k = torch.randn(1, 2, 256, 8), torch.randn(1, 2, 256, 8)
    seen: list[int] = []
    original = torch.exp  # every block takes exp of its scores

    def spy(x, *args, **kwargs):
        seen.append(x.numel())
        return original(x, *args, **kwargs)

    torch.exp = spy
    try:
        req = build_request(q, k)
        chunked_stats(req, block_elements=2 * 32 * 256)
    finally:
        torch.exp = original
    assert seen and max(seen) <= 2 * 32 * 256 < 2 * 256 * 256


def test_float_mask_bias_edits_the_scores():
    """A float mask adds to the scores (interventions); very negative entries block keys."""
    q, k = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    bias = torch.zeros(1, 2, 12, 12)
    bias[0, 1, :, 3] = 2.5  # head 1: every query looks more at key 3
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    mask = bias.masked_fill(~causal, torch.finfo(torch.float32).min)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8) + bias).masked_fill(~causal, float("-inf"))
    attn = torch.softmax(scores, -1)
    for backend in ("dense", "chunked"):
        st = kernels.attention_stats(q, k, mask=mask, backend=backend)
        torch.testing.assert_close(st.rows["entropy"], metrics.entropy(attn), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(
            st.cols["received"], metrics.received(attn), atol=ATOL, rtol=RTOL
        )
    with pytest.raises(UnsupportedMetricError, match="chunked"):
        kernels.attention_stats(q, k, mask=mask, backend="triton")
