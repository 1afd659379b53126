"""MultiplexGRPOConfig: GRPOConfig plus the multiplex fields. Defaults are the paper's (K=3, weighted)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
from trl import GRPOConfig

from .mixers import MERGES, MIXERS, mixer_from_config
from .mixers.base import constructor_defaults
from .static_decode import check_decode_options


@dataclass
class MultiplexGRPOConfig(GRPOConfig):
    r"""
    Configuration for [`MultiplexGRPOTrainer`]: every [`~trl.GRPOConfig`] option keeps its meaning; these fields add
    Multiplex Thinking (Tang et al. 2026, arXiv 2601.08808).
    """

    multiplex_width: int = field(
        default=3,
        metadata={
            "help": "Multiplex width K: tokens drawn (with replacement) per thinking position and merged into one "
            "input embedding. 1 is ordinary discrete GRPO."
        },
    )
    multiplex_merge: str = field(
        default="weighted",
        metadata={
            "help": "How the K draws are merged: 'weighted' (w_j = p(k_j) / sum_l p(k_l), duplicates in their own "
            "slots) or 'averaged' (w_j = 1/K).",
            "choices": list(MERGES),
        },
    )
    thinking_end: str = field(
        default="</think>",
        metadata={
            "help": "End-of-thinking marker. One token for reasoning models: thinking ends when slot 0 draws it. A "
            "text marker of several tokens ends thinking at the first slot-0 token after which the decoded text "
            "contains it, whichever tokens wrote it."
        },
    )
    max_thinking_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Optional thinking budget (not in the paper): after this many thinking positions the marker is "
            "forced, so a model that never closes its thoughts still answers. Forced tokens are not trained on. "
            "Must be smaller than `max_completion_length`."
        },
    )

    mixer: str = field(
        default="multiplex",
        metadata={
            "help": "Token-mixing rule of the thinking phase: 'multiplex' (this paper), or MoT-G's 'dirichlet' "
            "(weights ~ Dirichlet(gamma * p) over the top-K) and 'mot_distinct' (K draws without replacement), "
            "trained with MoT-G's log-likelihood sum_j w_j log pi(k_j). 'soft' (Soft Thinking) and 'gumbel' "
            "(Stochastic Soft Thinking) are inference-only and refused here.",
            "choices": sorted(MIXERS),
        },
    )
    dirichlet_gamma: float = field(
        default=4.0, metadata={"help": "mixer='dirichlet': concentration gamma of Dirichlet(gamma * p) (MoT-G: 4)."}
    )
    gumbel_tau: float = field(
        default=0.5,
        metadata={"help": "mixer='gumbel': Gumbel-Softmax temperature tau (Stochastic Soft Thinking: 0.5)."},
    )
    cold_stop_entropy: float | None = field(
        default=None,
        metadata={
            "help": "mixer='soft': force the marker once the entropy stays below this for `cold_stop_steps` thinking "
            "positions (Soft Thinking: 0.01). None disables the cold stop."
        },
    )
    cold_stop_steps: int = field(
        default=256, metadata={"help": "mixer='soft': consecutive low-entropy positions before the cold stop."}
    )

    multiplex_compile: bool = field(
        default=False,
        metadata={
            "help": "Compile the rollout's decode step with torch.compile (CUDA graphs on a GPU). Needs "
            "cache_implementation='static' (a preallocated KV cache with fixed shapes). Same rollouts as the static "
            "loop without it, up to rounding; compiles again only for another batch size, a longer cache or other "
            "sampling options (temperature, top-k/p, min-p). Not with ZeRO-3 or FSDP (parameters are gathered anew "
            "for every generation)."
        },
    )

    reward_error: str = field(
        default="raise",
        metadata={
            "help": "When a reward function raises: 'raise' stops the run naming the function and the sample; "
            "'none' scores that sample None (TRL's semantics: excluded from the group baseline, zero advantage).",
            "choices": ["raise", "none"],
        },
    )

    def __getstate__(self):
        # Saved configs (training_args.bin in every checkpoint, and on the Hub) never carry the Hub token.
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state

    def rollout_filters(self) -> dict:
        """The `top_p`, `top_k` and `min_p` the multiplex rollout samples with: the fields, overridden by
        `generation_kwargs` as in TRL's own generation."""
        filters = {key: getattr(self, key) for key in ROLLOUT_GENERATION_KWARGS}
        if not self.use_vllm:
            filters.update({k: v for k, v in (self.generation_kwargs or {}).items() if k in ROLLOUT_GENERATION_KWARGS})
        return filters

    def __post_init__(self):
        # Checked before GRPOConfig's own checks so the message names our field first.
        width = self.multiplex_width
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"multiplex_width must be an integer >= 1 (1 = discrete GRPO), got {width!r}.")
        if not isinstance(self.thinking_end, str) or not self.thinking_end:
            raise ValueError(f"thinking_end must be a non-empty string such as '</think>', got {self.thinking_end!r}.")
        _check_other_mixers_fields(self)
        mixer = mixer_from_config(self)  # validates the mixer name and its parameters (multiplex_merge included)
        if not mixer.trainable:
            raise ValueError(
                f"mixer={self.mixer!r} cannot be trained: {mixer.why_not_trainable}; use 'multiplex', 'dirichlet' "
                "or 'mot_distinct' for GRPO."
            )
        if self.reward_error not in ("raise", "none"):
            raise ValueError(f"reward_error must be 'raise' or 'none', got {self.reward_error!r}.")
        if self.top_p is None or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (or None), got {self.min_p!r}.")
        if self.learning_rate is None or self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate!r}.")
        # TRL divides by these before its own checks (ZeroDivisionError) or fails only once the model is loaded.
        for name in (
            "num_generations",
            "num_iterations",
            "max_completion_length",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
        ):
            value = getattr(self, name)
            if value is None and name == "num_generations":  # typed optional, but TRL's GRPOConfig divides by it
                raise ValueError("num_generations must be an integer >= 2 (completions per prompt), got None.")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.max_completion_length is None and not self.use_vllm:  # the multiplex rollout decodes up to it
            raise ValueError(
                "max_completion_length=None leaves the multiplex rollout without a length limit: set it to an integer "
                ">= 1 (thinking and answer together)."
            )
        if self.temperature is None or self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (multiplex rollouts sample), got {self.temperature!r}.")
        budget = self.max_thinking_tokens
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
                raise ValueError(f"max_thinking_tokens must be a non-negative integer or None, got {budget!r}.")
            if self.max_completion_length is not None and budget >= self.max_completion_length:
                raise ValueError(
                    f"max_thinking_tokens ({budget}) must be smaller than max_completion_length "
                    f"({self.max_completion_length}) so the answer has room; lower it or raise max_completion_length."
                )
        if width > 1 and self.use_vllm:
            raise ValueError(
                "use_vllm=True cannot run multiplex rollouts (vLLM cannot feed a merged embedding per step): set "
                "use_vllm=False, or multiplex_width=1 for discrete GRPO with vLLM."
            )
        if self.use_vllm:  # width 1 with vLLM is TRL's own generation: the rollout's settings would do nothing
            defaults = _field_defaults(self)
            changed = [name for name in ROLLOUT_ONLY_FIELDS if getattr(self, name) != defaults[name]]
            if changed:
                raise ValueError(
                    f"{changed[0]} needs the multiplex rollout, but use_vllm=True runs TRL's vLLM generation: remove "
                    f"{changed[0]}, or set use_vllm=False."
                )
        if not self.use_vllm:  # the multiplex rollout runs its own decode loop
            check_decode_options(self.cache_implementation, self.multiplex_compile)
        if not self.use_vllm and self.repetition_penalty != 1.0:  # the multiplex rollout runs at width 1 too
            raise ValueError(
                "repetition_penalty is not supported by the multiplex rollout: set it to 1.0 (or use_vllm=True with "
                "multiplex_width=1)."
            )
        super().__post_init__()
        # transformers checks the names only when the Trainer is built, after the model has loaded.
        unknown = [name for name in self.report_to or [] if name not in (*INTEGRATION_TO_CALLBACK, "none", None)]
        if unknown:
            raise ValueError(
                f"report_to {unknown[0]!r} is not a logging integration: use one of {sorted(INTEGRATION_TO_CALLBACK)}, "
                "'all' or 'none'."
            )
        # TRL reads these only once a rollout has been scored (loss_type after a whole rollout); a misspelling is
        # found here, before the model loads.
        for name, allowed in TRL_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        if not self.use_vllm:  # after GRPOConfig's parsing of dict fields given as JSON strings
            _check_generation_kwargs(self.generation_kwargs)
            if (self.chat_template_kwargs or {}).get("enable_thinking") is False:
                raise ValueError(
                    "chat_template_kwargs enable_thinking=False renders every prompt with thinking already closed, so "
                    "the multiplex rollout has no thinking phase: remove it (trl.GRPOTrainer trains without thinking)."
                )
            if self.use_transformers_continuous_batching:
                raise ValueError(
                    "use_transformers_continuous_batching does not apply: the multiplex rollout runs its own decode "
                    "loop; set it to False (cache_implementation='static' is its fixed-shape loop)."
                )
        if self.multiplex_compile and _shards_parameters(self):
            raise ValueError(
                "multiplex_compile=True cannot run under DeepSpeed ZeRO-3 or FSDP (the parameters are gathered anew "
                "for every generation, so a compiled step would hold stale ones): set multiplex_compile=False "
                "(cache_implementation='static' alone is fine) or use ZeRO-2 / DDP."
            )


# The loss types of the pinned TRL's GRPOTrainer._compute_loss.
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# The values the pinned TRL's GRPOTrainer accepts for these (scale_rewards after GRPOConfig maps True/False).
TRL_CHOICES = {
    "loss_type": TRL_LOSS_TYPES,
    "importance_sampling_level": ("token", "sequence"),
    "scale_rewards": ("group", "batch", "none"),
    "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum"),
}
# Fields only the multiplex rollout reads (not TRL's vLLM generation at width 1).
ROLLOUT_ONLY_FIELDS = (
    "max_thinking_tokens",
    "mixer",
    "multiplex_merge",
    "multiplex_compile",
    "dirichlet_gamma",
    "gumbel_tau",
    "cold_stop_entropy",
    "cold_stop_steps",
)
# Sampling keys of `generation_kwargs` the multiplex rollout applies (over the fields of the same name), as TRL's
# generate path does; `do_sample=True` is what it does anyway.
ROLLOUT_GENERATION_KWARGS = ("top_p", "top_k", "min_p")


def _check_generation_kwargs(kwargs) -> None:
    if not kwargs:
        return
    other = sorted(k for k in kwargs if k not in ROLLOUT_GENERATION_KWARGS and not (k == "do_sample" and kwargs[k]))
    if other:
        raise ValueError(
            f"generation_kwargs {other} cannot be applied by the multiplex rollout, which takes only "
            f"{list(ROLLOUT_GENERATION_KWARGS)} from them: remove the others (temperature, repetition_penalty and "
            "max_completion_length are fields of their own)."
        )
    top_p, min_p = kwargs.get("top_p", 1.0), kwargs.get("min_p", 0.0)
    if top_p is None or not 0.0 < top_p <= 1.0 or (min_p is not None and not 0.0 <= min_p <= 1.0):
        raise ValueError(f"generation_kwargs: top_p must be in (0, 1] and min_p in [0, 1], got {kwargs!r}.")


def _check_other_mixers_fields(args) -> None:
    """A mixer parameter set away from its default while another mixer is chosen would be silently ignored."""
    chosen = getattr(args, "mixer", "multiplex")
    defaults = _field_defaults(args)
    for name in sorted(MIXERS):
        if name == chosen:
            continue
        for param in constructor_defaults(name):
            if chosen in MIXERS and param in constructor_defaults(chosen):
                continue
            field_name = next((f for f in (param, f"multiplex_{param}") if f in defaults), None)
            if field_name is not None and getattr(args, field_name) != defaults[field_name]:
                raise ValueError(
                    f"{field_name} applies to mixer={name!r} only, but mixer is {chosen!r}: remove it, or set "
                    f"mixer={name!r}."
                )


def _field_defaults(args) -> dict:
    """Each dataclass field's default value, by name."""
    return {f.name: f.default for f in fields(args)}


def _shards_parameters(args) -> bool:
    """Whether this run shards the parameters and gathers them per generation (DeepSpeed ZeRO-3, FSDP)."""
    plugin = getattr(args, "deepspeed_plugin", None)  # built from --deepspeed or from `accelerate launch`'s env
    zero3 = getattr(plugin, "zero_stage", None) == 3 or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    return zero3 or bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
