"""MoT-G "different tokens" (Jain & Rappazzo 2025): K draws without replacement, weights p / sum p."""

from __future__ import annotations

from .base import Mixer
from .gumbel import gumbel_noise


class MoTDistinct(Mixer):
    name = "mot_distinct"
    trainable = True
    slot0_is_draw = True

    def draw(self, filtered, full_logprobs, generator):
        # Gumbel-top-k == sequential sampling without replacement; slot 0 is an exact draw from the filtered policy.
        keys = filtered.log_softmax(-1) + gumbel_noise(filtered.shape, filtered, generator)
        ids = keys.topk(self.width, dim=-1).indices
        logps = full_logprobs.gather(-1, ids)
        # Tokens outside the filter (when it keeps fewer than K) get weight 0 through exp(-inf) = 0.
        keep = filtered.gather(-1, ids).isfinite()
        weights = logps.masked_fill(~keep, float("-inf")).softmax(-1)
        return ids, weights

    def slot_coefficients(self, weights):
        return weights  # sum_j w_j log pi(k_j)
