"""Token-mixing strategies of the rollout engine. Adding one = one module with a `Mixer` subclass, imported here."""

from .base import MIXERS, Mixer, get_mixer, mixer_from_config
from .dirichlet import Dirichlet
from .gumbel import Gumbel
from .mot import MoTDistinct
from .multiplex import MERGES, Multiplex, merge_weights
from .soft import Soft


__all__ = [
    "MERGES",
    "MIXERS",
    "Dirichlet",
    "Gumbel",
    "Mixer",
    "MoTDistinct",
    "Multiplex",
    "Soft",
    "get_mixer",
    "merge_weights",
    "mixer_from_config",
]
