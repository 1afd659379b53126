"""Soft Thinking (Zhang et al. 2025): the deterministic top-k of the filtered distribution, renormalised."""

from __future__ import annotations

from .base import Mixer, top_slots


class Soft(Mixer):
    name = "soft"
    why_not_trainable = "it is deterministic, so a rollout has no likelihood to train (use it for inference)"
    # Paper defaults: top-k 10 of the filtered distribution (min-p 0.001, top-p 0.95, top-k 30, temperature 0.6),
    # cold stop after 256 positions whose entropy (temperature softmax, before the filters) is below 0.01.
    PAPER = {
        "width": 10,
        "min_p": 0.001,
        "top_p": 0.95,
        "top_k": 30,
        "temperature": 0.6,
        "cold_stop_entropy": 0.01,
        "cold_stop_steps": 256,
    }

    def __init__(self, width: int, cold_stop_entropy: float | None = None, cold_stop_steps: int = 256):
        super().__init__(width)
        if cold_stop_entropy is not None and cold_stop_entropy < 0:
            raise ValueError(f"cold_stop_entropy must be >= 0 (or None), got {cold_stop_entropy!r}.")
        if cold_stop_steps < 1:  # 0 would force the marker at the first thinking position, whatever the entropy
            raise ValueError(f"cold_stop_steps must be >= 1, got {cold_stop_steps!r}.")
        self.cold_stop_entropy, self.cold_stop_steps = cold_stop_entropy, cold_stop_steps

    def draw(self, filtered, full_logprobs, generator):
        return top_slots(filtered, self.width)  # sorted: slot 0 is the top-1 token
