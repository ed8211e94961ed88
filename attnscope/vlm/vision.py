"""Vision-tower scores per LLM image token, observed while the vision tower runs.

With a class token (CLIP): the attention the class token pays to each patch (mean over heads).
Without one (Qwen2-VL): the mean attention each patch receives from the patches of its image
(mean over queries and heads). Merged tokens (Qwen2-VL, m x m patches) take the mean of their
patches.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from attnscope.errors import AttnscopeError
from attnscope.kernels import attention_stats
from attnscope.kernels.request import build_request
from attnscope.probes.session import AttentionCall, ProbeSession
from attnscope.vlm.layout import ImageLayout, family_of


class ClassTokenScores:
    """Observer (``ProbeSession.attached(observer=...)``) keeping, per vision layer in ``layers``,
    the score of every vision token. Negative layers count from the end of the vision tower."""

    def __init__(self, probe: ProbeSession, layout: ImageLayout, layers: Iterable[int]) -> None:
        self.layout = layout
        self.class_token = family_of(probe.model.config).class_token
        vision = probe.layers("vision")
        n_layers = len(vision)
        wanted = {}
        for layer in layers:
            index = layer + n_layers if layer < 0 else layer
            if not 0 <= index < n_layers:
                raise AttnscopeError(
                    f"vision layer {layer} outside the vision tower's {n_layers} layers"
                )
            wanted[layer] = index
        self.layers = wanted  # as asked -> absolute index
        self._modules = {m: i for m, i in vision.items() if i in wanted.values()}
        self.scores: dict[int, dict[int, Tensor]] = {}  # absolute layer -> batch -> [N_vision]
        self.version = 0  # bumped on every observed call

    @torch.no_grad()
    def __call__(self, call: AttentionCall) -> None:
        layer = self._modules.get(call.module)
        if layer is None:
            return
        query, key = call.query, call.key
        offset, n = int(call.q_index[0]), query.shape[2]  # packed towers: one call per image
        if self.class_token:
            req = build_request(query[:, :, :1], key, causal=False, scale=call.scale, metrics=[])
            score = torch.softmax(req.scores(slice(None)), -1)[:, :, 0]  # [B, H, n]
        else:
            stats = attention_stats(
                query, key, causal=False, scale=call.scale, mask=call.mask, metrics=("received",)
            )
            score = stats.col_sums["received"] / n  # [B, H, n]
        per_batch = self.scores.setdefault(layer, {})
        for b, row in enumerate(score.mean(1).float().cpu()):
            buf = per_batch.get(b, torch.zeros(0))
            if buf.shape[0] < offset + n:
                buf = torch.cat([buf, torch.zeros(offset + n - buf.shape[0])])
            buf[offset : offset + n] = row
            per_batch[b] = buf
        self.version += 1

    def token_scores(self, layer: int) -> list[Tensor]:
        """Score of each LLM image token, one ``[n_i]`` tensor per image, for a layer as asked."""
        index = self.layers[layer]
        if index not in self.scores:
            raise AttnscopeError(
                "no vision-tower call was observed: run the model on its image inputs "
                "(pixel values) while the intervention is applied"
            )
        per_batch = self.scores[index]
        return [per_batch[s.vision_batch][s.vision_tokens()].mean(-1) for s in self.layout.images]
