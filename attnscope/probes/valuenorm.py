"""Value-norm attention (Kobayashi et al. 2020, "Attention is Not Only a Weight"): how much each key
adds to a head's output, ``alpha_ij * ||v_j W_O^h||``, renormalised over the keys of the row.

Renormalised, the weights are ``softmax_j(s_ij + log n_j^h)``: attention with a per-key, per-head
score bias ``log n_j^h``. Without a softcap that bias is one more dimension of q and k
(``q' = [q, 1]``, ``k' = [k, log n / scale]``), so every statistics backend computes the
norm-weighted statistics without the L x L matrix; with a softcap (added after it) the bias goes in
as an additive mask. A learned sink (gpt-oss) holds no value: it gets no norm-weighted weight.

```python
vn = asc.value_norm(lm, "The cat sat on the mat.")
vn.raw["sink_score"][..., 0], vn.weighted["sink_score"][..., 0]   # [L, H] first-token sink
vn.norms                                                           # [L, H, T] ||v_j W_O^h||
vn.table()                                                         # one row per head
```
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
from torch import Tensor
from transformers.pytorch_utils import Conv1D

from attnscope.errors import AttnscopeError
from attnscope.kernels import attention_stats
from attnscope.kernels.config import StatsConfig
from attnscope.kernels.stats import AttentionStats
from attnscope.models.loaded import LoadedModel
from attnscope.models.loader import input_device
from attnscope.probes.session import AttentionCall, ProbeSession

# statistics of both distributions: row metrics per query, column metrics per key
METRICS = (
    "entropy",
    "mean_distance",
    "waad",
    "sink_mass",
    "max_attention",
    "received",
    "sink_score",
)
ROW_NAMES = ("entropy", "mean_distance", "waad", "sink_mass", "max_attention")
OUTPUT_NAMES = ("o_proj", "out_proj", "c_proj")  # the attention module's output projection
TINY = 1e-30  # floor of a value norm before its log (a zero vector gets no weight)


def head_projections(model: torch.nn.Module, site_name: str, module: torch.nn.Module) -> Tensor:
    """The output projection of attention module ``site_name`` as one matrix per query head,
    ``[Hq * D, E]`` in the row-vector convention (head h's output is ``o_h @ W[h*D:(h+1)*D]``):
    the module's ``o_proj`` / ``out_proj`` / ``c_proj`` (GPT-2's Conv1D), or BERT's
    ``attention.output.dense`` next to ``attention.self``."""
    proj = next((getattr(module, n) for n in OUTPUT_NAMES if hasattr(module, n)), None)
    if proj is None and site_name.endswith(".self"):
        proj = model.get_submodule(site_name.removesuffix(".self") + ".output.dense")
    if isinstance(proj, Conv1D):
        return proj.weight.detach()  # [Hq * D, E]
    if isinstance(proj, torch.nn.Linear):
        return proj.weight.detach().T  # [Hq * D, E]
    raise AttnscopeError(
        f"{site_name} ({type(module).__name__}) has no output projection attnscope knows "
        f"({', '.join(OUTPUT_NAMES)} or BERT's output.dense): value-norm attention needs W_O"
    )


def value_norms(value: Tensor, w_o: Tensor) -> Tensor:
    """``n_j^h = ||v_j W_O^h||`` for every query head: value ``[B, Hkv, Tk, D]``, ``w_o``
    ``[Hq * D, E]`` (``head_projections``) -> ``[B, Hq, Tk]`` float32 (float64 for float64).
    Query heads that share a value head (GQA) see the same v through their own W_O^h."""
    hkv, d = value.shape[1], value.shape[3]
    if w_o.shape[0] % d or (w_o.shape[0] // d) % hkv:
        raise AttnscopeError(
            f"the output projection's {w_o.shape[0]} inputs are not a multiple of the value heads "
            f"({hkv} x head dim {d}): cannot split W_O per head"
        )
    hq = w_o.shape[0] // d
    dtype = torch.promote_types(value.dtype, torch.float32)
    heads = w_o.to(dtype).view(hq, d, -1)  # [Hq, D, E]
    gram = heads @ heads.transpose(-1, -2)  # [Hq, D, D]: ||v W||^2 = v G v^T
    v = value.to(dtype).repeat_interleave(hq // hkv, dim=1)  # [B, Hq, Tk, D]
    return torch.einsum("bhkd,hde,bhke->bhk", v, gram, v).clamp_min(0).sqrt()


def norm_weighted_stats(
    q: Tensor,
    k: Tensor,
    norms: Tensor,
    config: StatsConfig | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    mask: Tensor | None = None,
    **call: Any,
) -> AttentionStats:
    """``attention_stats`` of the renormalised ``alpha_ij * norms_j`` instead of ``alpha_ij``.

    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``, norms ``[B, Hq, Tk]`` (``value_norms``); the
    other arguments describe the attention call as for ``attention_stats`` (``sinks`` is refused:
    a learned sink holds no value, leave it out)."""
    if call.get("sinks") is not None:
        raise AttnscopeError("a learned sink holds no value: norm-weighted attention leaves it out")
    b, hq, tq, d = q.shape
    if norms.shape != (b, hq, k.shape[2]):
        raise AttnscopeError(
            f"norms must be [B, Hq, Tk] = {(b, hq, k.shape[2])}, got {tuple(norms.shape)}"
        )
    scale = d**-0.5 if scale is None else scale
    log_n = norms.clamp_min(TINY).log()  # [B, Hq, Tk]
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k = q.to(dtype), k.to(dtype)
    if softcap is None:  # the bias as one more dimension: q' k'^T * scale = s + log n
        kh = k.repeat_interleave(hq // k.shape[1], dim=1)  # [B, Hq, Tk, D]
        q = torch.cat([q, q.new_ones(b, hq, tq, 1)], -1)  # [B, Hq, Tq, D + 1]
        k = torch.cat([kh, (log_n / scale).to(dtype)[..., None]], -1)  # [B, Hq, Tk, D + 1]
        return attention_stats(q, k, config, scale=scale, mask=mask, **call)
    if mask is not None and mask.dim() == 2 and call.get("k_pos") is None:
        call["k_pos"] = mask.long().cumsum(-1) - 1  # key padding: real tokens count, as for 2-D
    bias = log_n[:, :, None, :].to(dtype).expand(b, hq, tq, -1)  # [B, Hq, Tq, Tk]
    return attention_stats(
        q, k, config, scale=scale, softcap=softcap, mask=_with_bias(mask, bias), **call
    )


def _with_bias(mask: Tensor | None, bias: Tensor) -> Tensor:
    """An additive mask ``[B, Hq, Tq, Tk]``: ``mask`` (None, key padding ``[B, Tk]``, bool or
    additive ``[B, 1|Hq, Tq, Tk]``) plus the score ``bias``."""
    if mask is None:
        return bias.contiguous()
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    if not mask.is_floating_point():
        blocked = torch.finfo(bias.dtype).min
        mask = torch.zeros(mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(
            ~mask.bool(), blocked
        )
    return (mask.to(bias.dtype) + bias).contiguous()


@dataclass
class ValueNorm:
    """Raw and norm-weighted attention statistics of one text, per layer and head.

    ``raw`` / ``weighted``: metric -> ``[L, H, T]`` (row metrics per query, ``received`` and
    ``sink_score`` per key); ``norms`` ``[L, H, T]``: ``||v_j W_O^h||`` of each key."""

    model: str
    tokens: list[str]
    layers: list[int]
    norms: Tensor
    raw: dict[str, Tensor]
    weighted: dict[str, Tensor]
    meta: dict = field(default_factory=dict)

    def table(self) -> pa.Table:
        """One row per head: each row metric's mean over the queries, raw and norm-weighted;
        the first token's sink score (mean attention it receives), raw and norm-weighted; and its
        value norm relative to the mean of the other tokens'."""
        others = self.norms[..., 1:].mean(-1) if len(self.tokens) > 1 else self.norms[..., 0]
        columns: dict[str, Tensor] = {
            "first_norm_ratio": self.norms[..., 0] / others,
            "raw_first_sink": self.raw["sink_score"][..., 0],
            "norm_first_sink": self.weighted["sink_score"][..., 0],
        }
        for name in ROW_NAMES:
            columns[f"raw_{name}"] = self.raw[name].nanmean(-1)
            columns[f"norm_{name}"] = self.weighted[name].nanmean(-1)
        n_layers, n_heads = self.norms.shape[:2]
        rows = {
            "layer": [layer for layer in self.layers for _ in range(n_heads)],
            "head": list(range(n_heads)) * n_layers,
        }
        rows.update({name: value.flatten().tolist() for name, value in columns.items()})
        return pa.table(rows)


class _Observer:
    """Collects both distributions' statistics and the value norms of one forward pass."""

    def __init__(self, model: torch.nn.Module, role: str, config: StatsConfig) -> None:
        self.model, self.role, self.config = model, role, config
        self.by_layer: dict[int, tuple[AttentionStats, AttentionStats, Tensor]] = {}

    @torch.no_grad()
    def __call__(self, call: AttentionCall) -> None:
        site = call.site
        if site.role != self.role or not self.config.wants_layer(site.layer):
            return
        if call.value is None:
            raise AttnscopeError(f"{site.name}: the attention call carried no value vectors")
        if site.layer in self.by_layer:
            raise AttnscopeError(
                "value_norm runs one forward pass of the whole text; "
                f"{site.name} was called twice (a KV cache or generate() inside?)"
            )
        common = dict(
            causal=site.causal,
            scale=call.scale,
            sliding_window=call.sliding_window,
            mask=call.mask,
            q_pos=call.q_index[None],
            k_pos=call.k_index[None],
        )
        q, k = call.query.detach(), call.key.detach()
        raw = attention_stats(q, k, self.config, softcap=call.softcap, sinks=call.sinks, **common)
        w_o = head_projections(self.model, site.name, call.module)
        norms = value_norms(call.value.detach(), w_o)  # [B, Hq, Tk]
        weighted = norm_weighted_stats(q, k, norms, self.config, softcap=call.softcap, **common)
        self.by_layer[site.layer] = (raw, weighted, norms)


def _stacked(stats: Iterable[AttentionStats]) -> dict[str, Tensor]:
    """Rows and finished columns of the first sequence, stacked over layers -> ``[L, H, T]``."""
    per_layer = [{**s.rows, **s.cols} for s in stats]
    return {name: torch.stack([d[name][0].cpu() for d in per_layer]) for name in per_layer[0]}


@torch.no_grad()
def value_norm(
    lm: LoadedModel,
    text: str | Tensor,
    layers: Iterable[int] | None = None,
    *,
    config: StatsConfig | None = None,
    **shortcuts: Any,
) -> ValueNorm:
    """Raw and value-norm-weighted attention statistics of ``text`` (or its token ids ``[T]``)
    on ``lm``'s text self-attention (decoder, or the encoder of an encoder-only model), one
    forward pass.

    ``config`` / keyword ``shortcuts`` (``window``, ``sink_tokens``, ``backend``, ...) as for
    ``capture``; the metrics are ``METRICS``."""
    if lm.kind not in ("causal-lm", "encoder"):
        raise AttnscopeError(f"value_norm takes text models; {lm.name!r} is a {lm.kind} model")
    config = StatsConfig.build(config, **shortcuts).replace(
        metrics=METRICS, layers=None if layers is None else tuple(layers)
    )
    model = lm.model
    if isinstance(text, str):
        ids = lm.tokenizer(text, return_tensors="pt").input_ids  # [1, T]
    else:
        ids = text.reshape(1, -1).long()
    if ids.shape[1] == 0:
        raise AttnscopeError(f"the text {str(text)[:40]!r} gives no token: give at least one")
    ids = ids.to(input_device(model))
    session = ProbeSession.of(model)
    role = "decoder" if session.layers("decoder") else "encoder"
    known = sorted(session.layers(role).values())
    missing = sorted(set(config.layers or ()) - set(known))
    if missing:
        raise AttnscopeError(f"layers {missing} not in {lm.name!r}'s layers 0-{len(known) - 1}")
    observer = _Observer(model, role, config)
    with session.attached(observer=observer):
        model(input_ids=ids)
    order = sorted(observer.by_layer)
    found = [observer.by_layer[layer] for layer in order]
    return ValueNorm(
        model=lm.name,
        tokens=lm.tokenizer.convert_ids_to_tokens(ids[0].tolist()),
        layers=order,
        norms=torch.stack([norms[0].cpu() for _, _, norms in found]),
        raw=_stacked(raw for raw, _, _ in found),
        weighted=_stacked(weighted for _, weighted, _ in found),
        meta={"role": role, "stats_config": config.to_json(), "backend": found[0][0].backend},
    )
