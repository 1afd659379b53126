"""Every recipe parses strictly through the script's real parser, and the paper recipes hold the paper's settings."""

import dataclasses
import enum
import re
import types
import typing
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig

from multiplex_trl.data import PROMPT_TEMPLATE
from multiplex_trl.grpo import ConfigError, ScriptArguments, parse_args


ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*/*/config_*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
SECTIONS = ["# Model arguments", "# Data training arguments", "# GRPO trainer config", "# Multiplex arguments"]
PAPER = [p for p in RECIPES if p.name == "config_paper.yaml"]
# The bf16 recipes are for GPUs; on a CPU-only machine TrainingArguments accepts bf16 only with use_cpu.
CPU = ["--use_cpu", "true"]


def test_the_expected_recipes_exist():
    names = {str(p.relative_to(ROOT / "recipes")) for p in RECIPES}
    assert {
        "DeepSeek-R1-Distill-Qwen-1.5B/multiplex_grpo/config_paper.yaml",
        "DeepSeek-R1-Distill-Qwen-1.5B/grpo/config_paper.yaml",
        "DeepSeek-R1-Distill-Qwen-7B/multiplex_grpo/config_paper.yaml",
        "DeepSeek-R1-Distill-Qwen-7B/grpo/config_paper.yaml",
        "DeepSeek-R1-Distill-Qwen-7B/multiplex_grpo/config_lora.yaml",
        "SmolLM2-135M-Instruct/multiplex_grpo/config_demo.yaml",
    } <= names


def accepts(tp, value) -> bool:
    """Whether a YAML value has the type a dataclass field declares (argparse converts only string defaults)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(accepts(a, value) for a in args)
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        return isinstance(value, list) and all(accepts(args[0], v) for v in value) if args else isinstance(value, list)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in {m.value for m in tp}
    return True  # anything else is left to the dataclass's own validation


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_parses_strictly(path):
    text = path.read_text()
    raw = yaml.safe_load(text)
    assert "env" not in raw, "recipes must not change the environment"
    # Unknown keys: TrlParser raises for keys no dataclass consumes (fail_with_unknown_args, on by default).
    parsed = parse_args(["--config", str(path), *CPU])
    # Types and choices: the parser takes a YAML value as the field's default without converting or checking it.
    for key, value in raw.items():
        owner = next(obj for obj in parsed if key in {f.name for f in dataclasses.fields(obj)})
        field = next(f for f in dataclasses.fields(owner) if f.name == key)
        hints = typing.get_type_hints(type(owner))
        assert accepts(hints[key], value), f"{key}: {value!r} is not a {hints[key]}"
        choices = field.metadata.get("choices")
        assert choices is None or value in choices, f"{key}: {value!r} is not one of {choices}"
    # Layout: the four sections, in order, and the exact launch line of this recipe at the top.
    positions = [text.find(s + "\n") for s in SECTIONS]
    assert -1 not in positions and positions == sorted(positions), f"sections {SECTIONS} missing or out of order"
    header = text[: positions[0]]
    launch = re.search(r"^# (accelerate launch|python) .*-m multiplex_trl\.grpo", header, flags=re.M)
    assert launch, "the launch line must be a comment at the top"
    assert f"--config recipes/{path.relative_to(ROOT / 'recipes')}" in header
    for config in re.findall(r"--config_file (\S+)", header):
        assert (ROOT / config).is_file(), f"the launch line names a missing {config}"


def test_a_misspelled_recipe_key_fails(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(PAPER[0].read_text() + "multiplex_widht: 3\n")
    with pytest.raises(ConfigError, match="multiplex_widht"):
        parse_args(["--config", str(recipe), *CPU])


@pytest.mark.parametrize("path", PAPER, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_paper_recipes_hold_the_paper_settings(path):
    script, args, model = parse_args(["--config", str(path), *CPU])
    assert model.model_name_or_path == f"deepseek-ai/{path.parts[-3]}"
    assert script.dataset_name == "agentica-org/DeepScaleR-Preview-Dataset"
    assert script.prompt_template == PROMPT_TEMPLATE and script.reward_funcs == ["accuracy"]
    assert args.multiplex_width == (3 if path.parts[-2] == "multiplex_grpo" else 1)
    assert args.multiplex_merge == "weighted" and args.thinking_end == "</think>"
    assert args.max_thinking_tokens is None  # no thinking budget in the paper
    assert (args.learning_rate, args.beta, args.num_generations, args.num_iterations) == (1e-6, 0.0, 8, 1)
    assert (args.temperature, args.top_p, args.max_completion_length, args.max_steps) == (1.0, 1.0, 4096, 300)
    assert args.bf16 and model.dtype == "bfloat16"
    # 128 prompts per step on the 8 GPUs the launch line uses.
    completions = 8 * args.per_device_train_batch_size * args.gradient_accumulation_steps
    assert completions // args.num_generations == 128


def test_baselines_differ_from_multiplex_only_in_width_and_names():
    for size in ("1.5B", "7B"):
        folder = ROOT / "recipes" / f"DeepSeek-R1-Distill-Qwen-{size}"
        multiplex = yaml.safe_load((folder / "multiplex_grpo" / "config_paper.yaml").read_text())
        baseline = yaml.safe_load((folder / "grpo" / "config_paper.yaml").read_text())
        differ = {k for k in multiplex.keys() | baseline.keys() if multiplex.get(k) != baseline.get(k)}
        assert differ == {"multiplex_width", "multiplex_merge", "output_dir", "hub_model_id"}


def test_demo_recipe_runs_offline_on_cpu():
    script, args, model = parse_args(
        ["--config", str(ROOT / "recipes/SmolLM2-135M-Instruct/multiplex_grpo/config_demo.yaml")]
    )
    assert model.model_name_or_path == "smollm2-135m" and args.use_cpu and not args.bf16
    assert args.multiplex_width == 3 and args.max_thinking_tokens
    # SmolLM2 has no thinking token: the marker is a line the prompt asks the model to write
    assert args.thinking_end in script.prompt_template
    assert args.max_thinking_tokens < args.max_completion_length <= 160 and 4 <= args.num_generations <= 8
    assert not args.push_to_hub and args.report_to in ([], ["none"], "none")
    assert not re.fullmatch(r"[\w.-]+/[\w.-]+", script.dataset_name), "the demo needs an offline dataset"


def test_script_arguments_document_every_field():
    for f in dataclasses.fields(ScriptArguments):
        assert f.metadata.get("help"), f"ScriptArguments.{f.name} has no help text"


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    config = ClusterConfig.from_yaml_file(path)  # accelerate's own loader: unknown keys raise
    assert config.distributed_type in ("MULTI_GPU", "DEEPSPEED")
    if config.distributed_type == "DEEPSPEED":
        stage = config.deepspeed_config["zero_stage"]
        assert stage == (2 if path.stem == "zero2" else 3)
        if stage == 3:
            assert config.deepspeed_config["zero3_save_16bit_model"], "ZeRO-3 must save consolidated weights"


def test_accelerate_configs_are_all_there():
    names = {p.name for p in ACCELERATE_CONFIGS}
    assert {"ddp.yaml", "zero2.yaml", "zero3.yaml", "zero3_offload.yaml", "zero3_multinode.yaml"} <= names
    multinode = (ROOT / "accelerate_configs/zero3_multinode.yaml").read_text()
    assert "--machine_rank" in multinode and "--main_process_ip" in multinode
