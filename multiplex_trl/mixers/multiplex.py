"""Multiplex Thinking (Tang et al. 2026): K i.i.d. draws with replacement, weighted by p or averaged."""

from __future__ import annotations

import torch

from .base import Mixer


MERGES = ("weighted", "averaged")


def merge_weights(logps: torch.Tensor, merge: str) -> torch.Tensor:
    """Weights of the K slots: p(k_j) / sum_l p(k_l) over slots, duplicates counted in their own slots, or 1/K."""
    if merge == "weighted":
        # softmax over slots of log p == p_j / sum_l p_l, computed stably; the filter's normaliser cancels.
        return logps.softmax(dim=-1)
    if merge == "averaged":
        return torch.full_like(logps, 1.0 / logps.size(-1))
    raise ValueError(f"multiplex_merge must be one of {list(MERGES)}, got {merge!r}.")


class Multiplex(Mixer):
    name = "multiplex"
    trainable = True
    slot0_is_draw = True

    def __init__(self, width: int, merge: str = "weighted"):
        super().__init__(width)
        if merge not in MERGES:
            raise ValueError(f"multiplex_merge must be one of {list(MERGES)}, got {merge!r}.")
        self.merge = merge

    def draw(self, filtered, full_logprobs, generator):
        # torch's one-sample path adds two host syncs per call; two i.i.d. draws, keeping the first, is cheaper.
        draws = max(self.width, 2)
        ids = torch.multinomial(filtered.softmax(-1), draws, replacement=True, generator=generator)[:, : self.width]
        return ids, merge_weights(full_logprobs.gather(-1, ids), self.merge)

    def slot_coefficients(self, weights):
        # The K draws are independent: the position's log-prob is the sum over all K slots.
        return torch.ones_like(weights)
