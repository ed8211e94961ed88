"""Teacher-forced scores of a speech model as functions of the audio part of its log-mel input.

The window's padded tail (frames after the audio) is held fixed, so attributions cover exactly the
frames that hold audio and perturbations never touch the padding.
"""

from __future__ import annotations

import torch
from torch import Tensor


class TeacherForced:
    """The model forced through ``prefix + targets``; inputs are audio features ``[B, M, n]``.

    ``features`` ``[1, M, N]`` is the whole window; the first ``n`` mel frames are the audio part
    that callers vary, the rest is appended unchanged. Row ``t`` of every output scores
    ``targets[t]``, predicted after ``prefix + targets[:t]``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        features: Tensor,
        prefix: list[int],
        targets: list[int],
        n_audio: int,
    ) -> None:
        self.model = model
        self.tail = features[..., n_audio:]  # [1, M, N - n]
        self.audio = features[..., :n_audio]  # [1, M, n]
        decoder = prefix + targets[:-1]  # the last target is predicted, never fed
        self.decoder_ids = torch.tensor([decoder], device=features.device)  # [1, P + T - 1]
        self.rows = slice(len(prefix) - 1, len(decoder))
        self.targets = torch.tensor(targets, device=features.device)  # [T]

    def log_probs(self, audio: Tensor) -> Tensor:
        """Log-probability of every output distribution ``[B, T, V]``."""
        b = audio.shape[0]
        features = torch.cat([audio, self.tail.expand(b, -1, -1)], dim=-1)
        logits = self.model(
            input_features=features, decoder_input_ids=self.decoder_ids.expand(b, -1)
        ).logits[:, self.rows]
        return torch.log_softmax(logits.float(), dim=-1)

    def target_log_probs(self, audio: Tensor) -> Tensor:
        """Log-probability of each target token ``[B, T]``."""
        lp = self.log_probs(audio)
        return lp.gather(-1, self.targets.expand(lp.shape[0], -1)[..., None])[..., 0]

    @torch.no_grad()
    def negative_kl(self, audio: Tensor, reference: Tensor) -> Tensor:
        """``-KL(p_reference || p(audio))`` per output token ``[B, T]``; ``reference`` ``[1, T, V]``
        log-probs. Zero for the unperturbed input, so ``f(x) - f(x')`` is the KL divergence."""
        lp = self.log_probs(audio)
        return -(reference.exp() * (reference - lp)).sum(-1)
