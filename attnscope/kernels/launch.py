"""Launch configurations of the fused Triton kernels and the variants they are validated on.

One place for both, read by the kernel launcher (``triton_stats``), the compile check
(``benchmarks/triton_compile.py``: real cubin for sm_80 / sm_90 on a machine without a GPU) and
the GPU check (``benchmarks/gpu_check.py``, the ``cuda`` tests). Pure Python: no triton import.

A tile has ``block_m`` rows and ``block_n`` keys. With ``pack`` its rows are the query heads of one
KV group (up to ``block_m // MIN_POSITIONS`` of them, a power of two) times ``block_m // heads``
query positions, so each key tile is loaded once per group, not once per query head
(KERNELS.md). On CUDA the kernels are autotuned over the candidates for their head dim and input
precision; the interpreter runs one small configuration of its own.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

Kind = Literal["row", "col"]  # the kernel
Pass = Literal["row", "fused", "col"]  # its use: "fused" is the row kernel with P @ V (HAS_V)
MIN_POSITIONS = 8  # query positions per tile at least, however many heads it packs


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # rows of a tile: packed query heads x query positions
    block_n: int  # keys of a tile
    pack: bool  # pack the query heads of a KV group into the rows
    num_warps: int
    num_stages: int
    # the row pass takes the score dots in this many slices of the head dim and reloads the
    # query tile per key tile instead of holding it in registers (fp32 fused forward at d 256)
    split_d: int = 1

    def heads(self, groups: int) -> int:
        """Query heads per tile for ``groups`` query heads per KV head (a power of two; a group
        larger than that spans several tiles, a smaller one leaves padding rows)."""
        if not self.pack:
            return 1
        return min(1 << (groups - 1).bit_length(), self.block_m // MIN_POSITIONS)

    def constexprs(self, kind: Kind, groups: int) -> dict[str, int]:
        """The tile arguments of the ``kind`` kernel for ``groups`` query heads per KV head."""
        tile = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, GP=self.heads(groups))
        return tile | dict(SPLIT_D=self.split_d) if kind == "row" else tile

    def label(self) -> str:
        pack = "packed" if self.pack else "per head"
        split = f" d/{self.split_d}" if self.split_d > 1 else ""
        return f"{self.block_m}x{self.block_n} {pack} w{self.num_warps} s{self.num_stages}{split}"


# Candidates per pass, table and padded head dim; the first is the default without autotuning.
# Row pass: the query tile stays while key tiles stream; column pass: the key tile stays while
# query tiles stream, so packing saves little there and costs parallelism at short lengths: both
# are candidates. The fused forward (row pass with P @ V) adds a [block_m, Dv] fp32 accumulator
# and streams value tiles too. fp32 inputs (tf32x3 dots) need smaller tiles. Every entry compiles
# without register spills and within shared memory on sm_80 and sm_90
# (benchmarks/triton_compile.py, tests/test_triton_compile.py).
CONFIGS: dict[tuple[Pass, str], dict[int, tuple[TileConfig, ...]]] = {
    ("row", "half"): {
        64: (TileConfig(128, 64, True, 8, 3), TileConfig(64, 128, True, 8, 3)),
        128: (TileConfig(128, 64, True, 8, 3), TileConfig(64, 64, True, 4, 3)),
        256: (TileConfig(64, 64, True, 8, 2), TileConfig(128, 32, True, 8, 2)),
    },
    ("fused", "half"): {
        64: (TileConfig(128, 32, True, 8, 3), TileConfig(64, 64, True, 8, 3)),
        128: (TileConfig(128, 32, True, 8, 3), TileConfig(64, 64, True, 8, 3)),
        256: (TileConfig(64, 64, True, 8, 1), TileConfig(64, 32, True, 8, 2)),
    },
    ("col", "half"): {
        64: (TileConfig(64, 64, True, 8, 3), TileConfig(32, 64, False, 4, 3)),
        128: (TileConfig(64, 64, True, 8, 3), TileConfig(32, 64, False, 4, 3)),
        256: (TileConfig(64, 64, True, 8, 2), TileConfig(32, 64, False, 4, 2)),
    },
    ("row", "fp32"): {
        64: (TileConfig(64, 32, True, 8, 3), TileConfig(128, 32, True, 8, 2)),
        128: (TileConfig(64, 16, True, 4, 2), TileConfig(32, 64, True, 8, 2)),
        256: (TileConfig(16, 32, True, 4, 2),),
    },
    ("fused", "fp32"): {
        64: (TileConfig(64, 32, True, 8, 3), TileConfig(32, 32, True, 8, 2)),
        128: (TileConfig(64, 16, True, 8, 2), TileConfig(16, 32, True, 4, 2)),
        256: (TileConfig(16, 32, True, 4, 1, split_d=2),),
    },
    ("col", "fp32"): {
        64: (TileConfig(32, 64, False, 4, 2), TileConfig(32, 64, True, 4, 2)),
        128: (TileConfig(64, 32, False, 8, 2), TileConfig(16, 64, False, 4, 2)),
        256: (TileConfig(32, 16, False, 4, 2),),
    },
}
# The interpreter runs programs one after another in numpy: small tiles, few programs.
INTERPRETER_CONFIG = TileConfig(32, 16, True, 4, 1)


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two (at least 16, the smallest ``tl.dot`` operand)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def candidates(
    kind: Pass, head_dim: int, dtype: torch.dtype, interpret: bool
) -> tuple[TileConfig, ...]:
    """Launch configurations the pass ``kind`` may use: the interpreter's one, or the table
    entry for the inputs' precision (fp32 or half) and the padded head dim (dims above 256 take
    the 256 entry, below 64 the 64 one)."""
    if interpret:
        return (INTERPRETER_CONFIG,)
    table = "fp32" if dtype == torch.float32 else "half"
    return CONFIGS[kind, table][min(max(block_d(head_dim), 64), 256)]


SIZE_CLASSES = (256, 4096, 32768)  # lengths at which autotuning starts over


def size_class(length: int) -> int:
    """Autotuning bucket of a length (decode steps, short, long and very long sequences tune
    separately; a new length in the same bucket reuses the choice)."""
    return bisect.bisect_right(SIZE_CLASSES, length)


# GPU limits of the compile check: usable shared memory per block, in bytes.
SHARED_MEMORY = {80: 166912, 90: 232448}  # A100 164 KB, H100 227 KB


@dataclass(frozen=True)
class Variant:
    """One kernel variant: an ``attention_stats`` call shape that selects a set of constexpr
    flags (with ``value``: a ``fused_attention`` call, the row pass with P @ V). ``inputs``
    builds it at any length."""

    name: str
    dtype: torch.dtype = torch.bfloat16
    head_dim: int = 128
    heads: tuple[int, int] = (8, 2)  # (query heads, KV heads): GQA 4:1 like Llama-3
    options: dict[str, Any] = field(default_factory=dict)  # attention_stats keywords
    mask: Literal["padding", "full"] | None = None
    sinks: bool = False
    batch: int = 1
    queries: int | None = None  # query rows at the end of the keys (None: as many as keys)
    value: bool = False  # the fused forward: also a value [B, Hkv, L, D] and the output

    def with_dtype(self, dtype: torch.dtype) -> Variant:
        return replace(self, name=f"{self.name}-{DTYPE_NAMES[dtype]}", dtype=dtype)

    def inputs(
        self, length: int, device: str | torch.device = "cpu", seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """``q [B, Hq, Tq, D]``, ``k [B, Hkv, L, D]``, the value ``[B, Hkv, L, D]`` (None without
        ``value``) and the keyword arguments of the call."""
        g = torch.Generator().manual_seed(seed)
        (hq, hkv), b, tq = self.heads, self.batch, self.queries or length
        q = torch.randn(b, hq, tq, self.head_dim, generator=g) * 2
        k = torch.randn(b, hkv, length, self.head_dim, generator=g) * 2
        kwargs = dict(self.options)
        if self.mask == "padding":  # left padding: a quarter of the keys of every other sequence
            valid = torch.ones(b, length, dtype=torch.bool)
            valid[::2, : length // 4] = False
            kwargs["mask"] = valid.to(device)
        elif self.mask == "full":  # a random per-head mask over a causal one
            full = torch.rand(b, hq, tq, length, generator=g) < 0.8
            kwargs["mask"] = (full & torch.ones(tq, length, dtype=torch.bool).tril(length - tq)).to(
                device
            )
        if self.sinks:
            kwargs["sinks"] = (torch.randn(hq, generator=g) * 2).to(device)
        v = None
        if self.value:
            v = torch.randn(b, hkv, length, self.head_dim, generator=g).to(device, self.dtype)
        return q.to(device, self.dtype), k.to(device, self.dtype), v, kwargs


DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _dtype_grid(prefix: str, value: bool) -> tuple[Variant, ...]:
    """Causal variants in every input dtype x head dim 64, 128, 256 (Gemma-3's)."""
    return tuple(
        Variant(f"{prefix}-{DTYPE_NAMES[dt]}-d{d}", dt, d, value=value)
        for dt in (torch.float16, torch.bfloat16, torch.float32)
        for d in (64, 128, 256)
    )


_FUSED_SLIDING = Variant(
    "fused-sliding", heads=(4, 1), head_dim=256, options=dict(sliding_window=24), value=True
)
# Each feature once in bf16, most at d 128 (fp32 again on the GPU).
FEATURES: tuple[Variant, ...] = (
    Variant("mha", heads=(4, 4)),
    Variant("gqa-8to1", heads=(16, 2)),
    Variant("gqa-6to1", heads=(6, 1), head_dim=64),
    Variant("decode", queries=1),
    Variant("noncausal", options=dict(causal=False)),
    Variant("key-padding", mask="padding", batch=2),
    Variant("full-mask", mask="full"),
    Variant("sliding", options=dict(sliding_window=24)),
    Variant("softcap", options=dict(softcap=20.0)),
    Variant("spans", options=dict(spans={"a": (1, 9), "b": (12, 30)}, sink_tokens=4)),
    Variant("sinks", sinks=True),
    Variant("no-fai", options=dict(metrics=("entropy", "received", "sink_score"))),
    Variant("fai-rows", options=dict(fai_rows=(32, 10**6), fai_horizon=(2, 40))),
    # the fused forward (exact_logits=False): GQA packing; Gemma-3's sliding layers (4:1, d 256),
    # also with the 4-D mask a capture passes once the keys outrun the window
    Variant("fused-gqa-8to1", heads=(16, 2), value=True),
    _FUSED_SLIDING,
    replace(_FUSED_SLIDING, name="fused-sliding-masked", mask="full"),
)
# The covering set: every dtype x head dim of the plain causal kernels and of the fused forward,
# then the features. Compiled for sm_80 / sm_90, run by the interpreter and GPU tests.
VARIANTS: tuple[Variant, ...] = (
    *_dtype_grid("causal", value=False),
    *_dtype_grid("fused", value=True),
    *FEATURES,
)
# The GPU checks run every variant in its dtype and the bf16 feature variants again in fp32.
GPU_VARIANTS: tuple[Variant, ...] = (
    *VARIANTS,
    *(v.with_dtype(torch.float32) for v in FEATURES),
)
