"""Multiplex Thinking for TRL: K-token branch-and-merge rollouts trained with GRPO (Tang et al. 2026)."""

from .config import MultiplexGRPOConfig
from .inference import Sample, format_branches, generate
from .logprobs import multiplex_logprobs
from .rollout import MultiplexRollout, multiplex_generate
from .trainer import MultiplexGRPOTrainer


__version__ = "0.1.0"

__all__ = [
    "MultiplexGRPOConfig",
    "MultiplexGRPOTrainer",
    "MultiplexRollout",
    "Sample",
    "format_branches",
    "generate",
    "multiplex_generate",
    "multiplex_logprobs",
]
