"""Packed GQA tiles of the Triton kernels in the interpreter against the independent float64
reference (tests/independent.py): the query heads of a KV group share a tile in the row and the
column pass. Tile shapes make every packing case happen: a whole group in one tile (4:1), a group
split over two tiles (8:1 with 4 heads per tile), padding heads (6:1 in tiles of 4 or 8), one
head per tile (the per-head column configuration); the row pass also with its score dots in
slices of the head dim, and as the fused forward (P @ V: the output against the float64
definition). Small shapes: the interpreter is slow."""

from __future__ import annotations

import pytest
import torch
from independent import reference_output, reference_stats

from attnscope import kernels
from attnscope.kernels import launch
from attnscope.kernels.fused import fused_attention

pytest.importorskip("attnscope.kernels.triton_stats")

TILES = {
    "4-heads-per-tile": launch.INTERPRETER_CONFIG,  # 32 rows: up to 4 heads x 8 positions
    "8-heads-per-tile": launch.TileConfig(64, 16, True, 4, 1),
    "per-head": launch.TileConfig(32, 16, False, 4, 1),
    "head-dim-in-halves": launch.TileConfig(32, 16, True, 4, 1, split_d=2),
}
# (hq, hkv, length, head dim) and keyword arguments of attention_stats and the reference
CASES = {
    "gqa-4to1-d64": dict(shape=(8, 2, 64, 64)),
    "gqa-8to1-d128": dict(shape=(8, 1, 48, 128), fai_horizon=(1, 12)),
    "gqa-4to1-d256": dict(shape=(4, 1, 40, 256)),
    "gqa-6to1-d64-sliding": dict(shape=(6, 1, 37, 64), sliding_window=9, fai_horizon=(2, 20)),
    "gqa-8to1-d64-sinks-spans": dict(
        shape=(8, 1, 33, 64), sinks=True, spans={"a": (2, 9), "b": (20, 33)}, sink_tokens=3
    ),
    "fused-gqa-6to1-d48-sliding": dict(shape=(6, 1, 45, 48), sliding_window=9, value=True),
}


def run(name: str, tile: launch.TileConfig, monkeypatch) -> None:
    monkeypatch.setattr(launch, "INTERPRETER_CONFIG", tile)
    case = dict(CASES[name])
    hq, hkv, n, d = case.pop("shape")
    g = torch.Generator().manual_seed(hq * 1000 + n * 10 + d)
    q = torch.randn(1, hq, n, d, generator=g) * 1.5
    k = torch.randn(1, hkv, n, d, generator=g) * 1.5
    if case.pop("sinks", False):
        case["sinks"] = torch.randn(hq, generator=g)
    if case.pop("value", False):  # the fused forward: output [1, Hq, n, d] too
        v = torch.randn(1, hkv, n, d, generator=g)
        out, got = fused_attention(q, k, v, backend="triton", **case)
        want_out = reference_output(q, k, v, sliding_window=case.get("sliding_window"))
        torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    else:
        got = kernels.attention_stats(q, k, backend="triton", **case)
    want = reference_stats(q, k, **case)
    for kind, a, b in (("row", got.rows, want.rows), ("col", got.cols, want.cols)):
        assert a.keys() == b.keys()
        for metric in b:
            torch.testing.assert_close(
                a[metric].double(),
                b[metric],
                atol=1e-4,
                rtol=1e-4,
                equal_nan=True,
                msg=lambda m, x=metric, t=kind: f"{t} {x}: {m}",
            )
    torch.testing.assert_close(got.lse.double(), want.lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_packed_heads_match_reference(name, monkeypatch):
    run(name, TILES["4-heads-per-tile"], monkeypatch)


@pytest.mark.parametrize("tile", ["8-heads-per-tile", "per-head", "head-dim-in-halves"])
@pytest.mark.parametrize(
    "name", ["gqa-8to1-d128", "gqa-6to1-d64-sliding", "fused-gqa-6to1-d48-sliding"]
)
def test_other_packings_match_reference(name, tile, monkeypatch):
    run(name, TILES[tile], monkeypatch)


def test_heads_per_tile():
    """Groups pack into the next power of two, capped by MIN_POSITIONS positions per tile."""
    tile = launch.TileConfig(128, 64, True, 8, 3)
    assert [tile.heads(g) for g in (1, 2, 3, 4, 6, 8, 16, 32)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert launch.TileConfig(128, 64, False, 8, 3).heads(8) == 1
