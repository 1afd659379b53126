"""MoT-G "dirichlet" (Jain & Rappazzo 2025): weights ~ Dirichlet(gamma * p) over the top-k."""

from __future__ import annotations

import torch

from .base import Mixer, representative_first, top_slots


class Dirichlet(Mixer):
    name = "dirichlet"
    trainable = True

    def __init__(self, width: int, dirichlet_gamma: float = 4.0):
        super().__init__(width)
        if dirichlet_gamma <= 0:
            raise ValueError(f"dirichlet_gamma must be > 0, got {dirichlet_gamma!r}.")
        self.gamma = dirichlet_gamma

    def draw(self, filtered, full_logprobs, generator):
        ids, p = top_slots(filtered, self.width)
        # torch's gamma sampler has no generator argument: this mixer draws from the global RNG.
        weights = torch.distributions.Dirichlet((self.gamma * p).clamp(min=1e-6)).sample()
        return representative_first(ids, weights)

    def slot_coefficients(self, weights):
        # MoT-G's per-position log-likelihood: sum_j w_j log pi(k_j), with the sampled weights stored in the rollout.
        return weights
