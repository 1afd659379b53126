"""Stochastic Soft Thinking (Wu et al. 2025): Gumbel-Softmax weights over the top-k, y = softmax((log p + g) / tau)."""

from __future__ import annotations

import torch

from .base import Mixer, representative_first, top_slots


def gumbel_noise(shape, like: torch.Tensor, generator) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=like.device).clamp(1e-10, 1 - 1e-10)
    return -torch.log(-torch.log(u))


class Gumbel(Mixer):
    name = "gumbel"
    why_not_trainable = "its weights have no density implemented here (use it for inference and evaluation)"

    def __init__(self, width: int, gumbel_tau: float = 0.5):
        super().__init__(width)
        if gumbel_tau <= 0:
            raise ValueError(f"gumbel_tau must be > 0, got {gumbel_tau!r}.")
        self.tau = gumbel_tau

    def draw(self, filtered, full_logprobs, generator):
        ids, p = top_slots(filtered, self.width)
        g = gumbel_noise(p.shape, p, generator)
        weights = ((p.log() + g) / self.tau).softmax(-1)
        return representative_first(ids, weights)
