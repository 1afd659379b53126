"""Train with Multiplex GRPO from a recipe: one process, DDP, DeepSpeed ZeRO or several nodes.

    python -m multiplex_trl.grpo --config recipes/SmolLM2-135M-Instruct/multiplex_grpo/config_demo.yaml
    accelerate launch --config_file accelerate_configs/zero3.yaml -m multiplex_trl.grpo \\
        --config recipes/DeepSeek-R1-Distill-Qwen-1.5B/multiplex_grpo/config_paper.yaml [--any_field value]

The YAML sets defaults and flags override them (TRL's `TrlParser`). Everything that can be checked without the model
(fields, dataset, reward names, a push while offline) is checked before the model is loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import types
import typing
from dataclasses import dataclass, field

import yaml
from transformers import AutoTokenizer
from transformers.trainer import TRAINER_STATE_NAME  # what every checkpoint the Trainer saves holds
from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from . import hub
from .config import MultiplexGRPOConfig
from .data import load_prompts
from .inference import find_model
from .markers import closing_rule
from .rewards import check_reward_columns, get_reward_funcs
from .static_decode import check_saved_model
from .trainer import MultiplexGRPOTrainer


@dataclass
class ScriptArguments:
    """Data, rewards and Hub options of the training script (the trainer's own options live in MultiplexGRPOConfig)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Training prompts: a Hub dataset id (owner/name), a local .jsonl/.json/.parquet file or folder, "
            "or an offline source: 'math500', 'math', 'gsm8k', 'reasoning_gym:<task>'."
        },
    )
    dataset_config: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset config name, or for 'reasoning_gym:<task>' the task's options as 'key=value,...'."
        },
    )
    dataset_split: str | None = field(
        default=None,
        metadata={"help": "Split to train on; default: the source's training split ('test' for math500)."},
    )
    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "User prompt with a '{problem}' placeholder. Default: the paper's \"{problem} Let's think step by "
            'step and output the final answer within \\boxed{}."'
        },
    )
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message before the prompt."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training prompts (smoke runs, demos)."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={
            "help": "Reward functions by name ('accuracy', 'reasoning_gym', 'format') or dotted import path "
            "('my_pkg.rewards.fn'). Weigh them with `reward_weights`."
        },
    )
    push_merged: bool = field(
        default=False,
        metadata={
            "help": "LoRA runs: also save the adapter merged into the base model to <output_dir>/merged and push "
            "those weights instead of the adapter."
        },
    )
    push_revisions: bool = field(
        default=False,
        metadata={"help": "Push every saved checkpoint to its own Hub branch 'step-<N>' (PushRevisionCallback)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an output_dir that holds a finished run: its contents are deleted first. Without it "
            "such a folder is refused (a crash would leave the old weights beside the new run's settings)."
        },
    )


class ConfigError(ValueError):
    """A recipe or flag that cannot work; raised before the model is loaded. The CLI prints it as one line."""


# Files a finished run leaves in output_dir (the final save); checkpoints alone are a run to resume.
FINISHED_RUN_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_model.safetensors",
)
# Exit status of a run stopped by SIGTERM (128 + 15, the shell's convention): its checkpoint is saved, it is not done.
PREEMPTED_EXIT = 143


class _Parser(TrlParser):
    def error(self, message):  # argparse prints its whole usage (hundreds of options) before the message
        raise ConfigError(message)

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        # A recipe value becomes an argparse default, and argparse converts only string defaults: a number of the
        # wrong kind or a list would reach the config as it is (`max_steps: 2.5` failed in the Trainer's loop, after
        # the model loaded; `temperature: [0.7]` with a TypeError).
        hints = {}
        for dataclass_type in self.dataclass_types:
            hints.update(typing.get_type_hints(dataclass_type))
        for name, value in kwargs.items():
            _check_recipe_number(name, value, hints.get(name))
        return super().set_defaults_with_config(**kwargs)


def _check_recipe_number(name: str, value, hint) -> None:
    """Refuse a recipe value that does not fit an int or float field (strings are left to argparse's conversion)."""
    if isinstance(value, str):
        return
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)]
    if len(kinds) != 1 or kinds[0] not in (int, float):
        return
    if value is None:
        if not optional:
            raise ConfigError(f"{name} must be a number, got null: set a value or remove the key from the recipe.")
        return
    number = (int,) if kinds[0] is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, number):
        what = "an integer" if kinds[0] is int else "a number"
        raise ConfigError(f"{name} must be {what}, got {value!r}: fix its value in the recipe.")


def make_parser() -> TrlParser:
    return _Parser((ScriptArguments, MultiplexGRPOConfig, ModelConfig))


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, MultiplexGRPOConfig, ModelConfig]:
    """Parse `--config recipe.yaml` plus flags; unknown recipe keys and flags are errors."""
    try:
        return make_parser().parse_args_and_config(argv)
    except ValueError as error:  # MultiplexGRPOConfig / GRPOConfig validation, unknown keys
        raise ConfigError(str(error)) from error
    except OSError as error:  # the recipe file
        raise ConfigError(f"--config: cannot read the recipe: {error}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"--config: the recipe is not valid YAML: {' '.join(str(error).split())}") from error


def _check_types(script_args: ScriptArguments, training_args: MultiplexGRPOConfig) -> None:
    """Recipe values keep their YAML type (argparse converts only strings): a number where a name belongs, one name
    where a list belongs."""
    for name in ("dataset_name", "dataset_config", "dataset_split", "prompt_template", "system_prompt"):
        value = getattr(script_args, name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}.")
    samples = script_args.max_train_samples
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int)):
        raise ConfigError(f"max_train_samples must be an integer, got {samples!r}.")
    funcs = script_args.reward_funcs
    if not isinstance(funcs, list) or not all(isinstance(f, str) for f in funcs):
        raise ConfigError(f"reward_funcs must be a list of names, e.g. ['accuracy'], got {funcs!r}.")
    weights = training_args.reward_weights
    if weights is not None and (
        not isinstance(weights, list)
        or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)
    ):
        raise ConfigError(f"reward_weights must be a list of numbers, one per reward function, got {weights!r}.")


def resume_checkpoint(training_args: MultiplexGRPOConfig) -> str | None:
    """The checkpoint folder `resume_from_checkpoint` names: a path, or "true" for output_dir's last one (as the
    Trainer's `True`, which a flag or a recipe can only spell as a string); None for "false" or unset."""
    resume = training_args.resume_from_checkpoint
    if resume is None or resume is False or str(resume).lower() == "false":
        return None
    if resume is True or str(resume).lower() == "true":
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise ConfigError(
                f"resume_from_checkpoint=true: output_dir {training_args.output_dir!r} has no checkpoint-<step> "
                "folder to resume from."
            )
        return last
    if not os.path.isdir(resume):
        raise ConfigError(f"resume_from_checkpoint: {resume!r} is not a folder (a checkpoint-<step> folder).")
    if not os.path.isfile(os.path.join(resume, TRAINER_STATE_NAME)):  # what every checkpoint the Trainer saves has
        raise ConfigError(
            f"resume_from_checkpoint: {resume!r} is not a checkpoint (it has no {TRAINER_STATE_NAME}): pass a "
            "checkpoint-<step> folder of output_dir, or true for its last one."
        )
    return resume


def _check_resume_settings(checkpoint: str, training_args: MultiplexGRPOConfig) -> None:
    """Refuse resuming a checkpoint with other rollout settings than it was trained with (its multiplex_config.json):
    the run would go on as another method under the same name, and its saved settings would describe neither half."""
    saved = hub.load_multiplex_settings(checkpoint)
    if saved is None:  # a checkpoint written without them (another tool): nothing to compare
        return
    current = json.loads(json.dumps(hub.multiplex_settings(training_args)))  # as the file holds them
    changed = [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in current if saved.get(k) != current.get(k)]
    if changed:
        raise ConfigError(
            f"resume_from_checkpoint: {checkpoint!r} was trained with other multiplex settings ({', '.join(changed)}):"
            " resume with the checkpoint's settings, or start a new run in another output_dir."
        )


def _check_output_dir(script_args: ScriptArguments, training_args: MultiplexGRPOConfig, resume: str | None) -> bool:
    """Refuse an output_dir that holds a finished run (unless resuming it or asked to overwrite it). True when it is
    to be overwritten: the caller deletes it once every other check has passed, so a refused run keeps it."""
    output_dir = training_args.output_dir
    finished = [f for f in FINISHED_RUN_FILES if os.path.isfile(os.path.join(output_dir, f))]
    if not finished or resume:
        return False
    if not script_args.overwrite_output_dir:
        raise ConfigError(
            f"output_dir {output_dir!r} holds a finished run ({finished[0]}): choose another output_dir, resume it "
            "with resume_from_checkpoint, or pass --overwrite_output_dir true to delete it first."
        )
    return True


def validate(script_args: ScriptArguments, training_args: MultiplexGRPOConfig, model_args: ModelConfig) -> None:
    """The cheap checks: required fields, reward weights, LoRA-only options, pushing while offline."""
    _check_types(script_args, training_args)
    if not model_args.model_name_or_path:
        raise ConfigError("model_name_or_path is required (a Hub id, a local folder, or 'smollm2-135m').")
    if not script_args.dataset_name:
        raise ConfigError("dataset_name is required (e.g. 'math500', 'reasoning_gym:basic_arithmetic', a .jsonl).")
    if not script_args.reward_funcs:
        raise ConfigError("reward_funcs is empty: name at least one, e.g. ['accuracy'].")
    weights = training_args.reward_weights
    if weights is not None and len(weights) != len(script_args.reward_funcs):
        raise ConfigError(
            f"reward_weights has {len(weights)} values but reward_funcs names {len(script_args.reward_funcs)} "
            f"({script_args.reward_funcs}): give one weight per reward function."
        )
    modules = model_args.lora_target_modules
    if isinstance(modules, str) and re.fullmatch(r"[\w.]+", modules):
        # TRL's ModelConfig turns one --lora_target_modules value into a string, which peft reads as a regex over the
        # whole module name: "q_proj" matched no module (an error after the model loaded). One plain name is a name.
        model_args.lora_target_modules = [modules]
    if script_args.push_merged and not model_args.use_peft:
        raise ConfigError("push_merged=True merges a LoRA adapter: it needs use_peft=True.")
    try:
        hub.check_push_possible(training_args, script_args.push_revisions)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def main(argv: list[str] | None = None) -> str:
    """Parse, check, load data and rewards, train, save (and push). Returns the saved model folder."""
    script_args, training_args, model_args = parse_args(argv)
    validate(script_args, training_args, model_args)
    try:
        # A local folder, a Hub id (cached when offline) or the demo model's name, converted on first use.
        model_path = find_model(model_args.model_name_or_path)
        reward_funcs = get_reward_funcs(script_args.reward_funcs)
        dataset = load_prompts(
            script_args.dataset_name,
            dataset_config=script_args.dataset_config,
            split=script_args.dataset_split,
            prompt_template=script_args.prompt_template,
            system_prompt=script_args.system_prompt,
            max_samples=script_args.max_train_samples,
            seed=training_args.seed,
        )
        check_reward_columns(reward_funcs, script_args.reward_funcs, dataset.column_names, script_args.dataset_name)
    except ValueError as error:  # missing model, unknown dataset / split / reward: one line, before the model
        raise ConfigError(str(error)) from error
    per_generation = training_args.generation_batch_size // training_args.num_generations
    if len(dataset) < per_generation:  # TRL's sampler drops an incomplete batch: the run would train no step
        raise ConfigError(
            f"the dataset has {len(dataset)} prompts but one generation batch takes {per_generation} "
            f"(generation_batch_size {training_args.generation_batch_size} / num_generations "
            f"{training_args.num_generations}): no step could run; give more prompts or a smaller batch."
        )
    try:  # the static cache against the model's config: the trainer checks it too, but once the model has loaded
        check_saved_model(
            model_path,
            training_args.cache_implementation,
            training_args.multiplex_compile,
            1 + training_args.max_completion_length,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from error
    resume = resume_checkpoint(training_args)
    if resume:
        _check_resume_settings(resume, training_args)
    overwrite = _check_output_dir(script_args, training_args, resume)

    # As TRL's grpo script: the trainer loads the model from its path with these kwargs (ZeRO-3 init included).
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        model_init_kwargs["quantization_config"] = quantization_config
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    tokenizer = AutoTokenizer.from_pretrained(
        model_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        padding_side="left",
    )
    try:  # the trainer reuses it (cached); here a refusal is one line, before the model loads
        closing_rule(tokenizer, training_args.thinking_end)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    # Only now, with every check passed: a refused run must not have deleted the finished one it was to replace.
    if overwrite and int(os.environ.get("RANK", "0")) == 0:  # one process deletes; the others write nothing before
        shutil.rmtree(training_args.output_dir)

    callbacks = [hub.MultiplexSettingsCallback(training_args)]
    if script_args.push_revisions:
        callbacks.append(hub.PushRevisionCallback(training_args))
    trainer = MultiplexGRPOTrainer(
        model=model_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    if trainer.preempted:  # SIGTERM: the checkpoint is saved; no final save or push, which would look finished
        checkpoint = os.path.join(training_args.output_dir, f"checkpoint-{trainer.state.global_step}")
        trainer.accelerator.print(
            f"Stopped by SIGTERM at step {trainer.state.global_step}: resume with --resume_from_checkpoint {checkpoint}."
        )
        trainer.end()
        raise Preempted(checkpoint)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()  # trainer_state.json: the per-step log history that reports and plots read
    folder = hub.finish_training(trainer, push_merged=script_args.push_merged, dataset_name=script_args.dataset_name)
    merged = f" (merged weights in {folder})" if folder != training_args.output_dir else ""
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}{merged}.")
    if training_args.push_to_hub:
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")
    trainer.end()  # finish the trackers, destroy the process group
    return folder


class Preempted(Exception):
    """The run was stopped by SIGTERM after saving the checkpoint this names; it is not finished."""


def cli(argv: list[str] | None = None) -> int:
    """`main` with configuration errors printed as one line (exit status 2) instead of a traceback; a run stopped by
    SIGTERM exits with 143 (its checkpoint saved)."""
    try:
        main(argv)
    except ConfigError as error:
        print(f"multiplex-trl grpo: error: {error}", file=sys.stderr)
        return 2
    except Preempted:
        return PREEMPTED_EXIT
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(cli())
