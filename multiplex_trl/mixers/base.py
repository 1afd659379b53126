"""The mixer interface: how one thinking position turns the policy's distribution into K slots and their weights.

A mixer sees the temperature-scaled logits of each row, already filtered (top-k / top-p / min-p, -inf outside),
and the full log-softmax. It returns K slot ids with slot 0 the *representative* token (the one the stop rule and
the readable text use) and K merge weights. Trainable mixers also say how much each slot's log-prob counts in the
per-position log-likelihood (`slot_coefficients`).
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch


MIXERS: dict[str, type[Mixer]] = {}


class Mixer:
    name: ClassVar[str]
    trainable: ClassVar[bool] = False
    why_not_trainable: ClassVar[str] = ""
    # Whether slot 0 is an exact draw from the filtered policy. When it is not (the top-k mixers: soft, gumbel,
    # dirichlet), the rollout draws each answer-phase token on its own, so decoding after the marker is ordinary
    # sampling (the method's answer phase) and a trained answer token's stored log-prob is that of a token the policy drew.
    slot0_is_draw: ClassVar[bool] = False
    # Soft Thinking's "cold stop": force the marker after `cold_stop_steps` positions with entropy below this.
    cold_stop_entropy: float | None = None
    cold_stop_steps: int = 256

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        MIXERS[cls.name] = cls

    def __init__(self, width: int):
        self.width = width

    def draw(
        self, filtered: torch.Tensor, full_logprobs: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, V] filtered scaled logits and full log-softmax -> (`ids` [B, K], `weights` [B, K]), slot 0 first."""
        raise NotImplementedError

    def slot_coefficients(self, weights: torch.Tensor) -> torch.Tensor:
        """[..., K] weight of each slot's log pi(k_j) in a mixed position's log-likelihood (trainable mixers)."""
        raise ValueError(f"mixer={self.name!r} cannot be trained: {self.why_not_trainable}")


def top_slots(filtered: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `width` most likely tokens of the filtered distribution and their renormalised probabilities."""
    probs = filtered.softmax(-1)
    p, ids = probs.topk(width, dim=-1)
    return ids, p / p.sum(-1, keepdim=True)


def draw_token(filtered: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row [B, 1] from the filtered distribution (two draws, the first kept: torch's one-sample path
    costs two host syncs)."""
    return torch.multinomial(filtered.softmax(-1), 2, replacement=True, generator=generator)[:, :1]


def representative_first(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder slots so slot 0 holds the highest weight (the 'top-1 of the noisy weights' stop rule)."""
    order = weights.argsort(-1, descending=True)
    return ids.gather(-1, order), weights.gather(-1, order)


def get_mixer(name: str = "multiplex", width: int = 3, **params) -> Mixer:
    """Build a mixer by name; unknown names and parameters fail with the accepted values."""
    if name not in MIXERS:
        raise ValueError(f"mixer must be one of {sorted(MIXERS)}, got {name!r}.")
    return MIXERS[name](width, **params)


def constructor_defaults(name: str) -> dict:
    """A mixer's own parameters (its constructor's, after `width`) and their default values."""
    params = list(inspect.signature(MIXERS[name].__init__).parameters.values())[2:]
    return {p.name: p.default for p in params}


def mixer_from_config(args) -> Mixer:
    """The mixer an args object (a config or a namespace) names, with the parameters its fields set.

    A mixer's constructor parameter `p` is read from the field `p`, or `multiplex_p` (e.g. `multiplex_merge`).
    """
    name = getattr(args, "mixer", "multiplex")
    if name not in MIXERS:
        raise ValueError(f"mixer must be one of {sorted(MIXERS)}, got {name!r}.")
    params = {}
    for p in constructor_defaults(name):
        for field in (p, f"multiplex_{p}"):
            if getattr(args, field, None) is not None:
                params[p] = getattr(args, field)
                break
    return get_mixer(name, args.multiplex_width, **params)
