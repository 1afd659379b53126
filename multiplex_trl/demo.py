"""`make demo`: multiplex GRPO on SmolLM2-135M-Instruct, offline, on CPU, then a report of what happened.

    python -m multiplex_trl.demo [--width 3] [--max_steps N] [--output DIR]
    python -m multiplex_trl.demo --compare     # the same run at width 1 and width 3, one reward chart

Training goes through the same entry point users launch (`accelerate launch -m multiplex_trl.grpo --config ...`);
this script prepares the model, runs it, and writes `report.md` and `training.png` in the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml


RECIPE = Path(__file__).resolve().parent.parent / "recipes/SmolLM2-135M-Instruct/multiplex_grpo/config_demo.yaml"
HELD_OUT = 4  # problems shown before and after training


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (0 used to fall back to the recipe's value unannounced)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other refusal of the demo (argparse printed its usage first)
        print(f"make demo: {message} (options: python -m multiplex_trl.demo --help).", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv=None):
    p = _Parser(prog="python -m multiplex_trl.demo", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default=str(RECIPE), help="the demo recipe (YAML)")
    p.add_argument("--output", default="outputs/demo", help="where runs, report.md and training.png go")
    p.add_argument(
        "--width", type=positive_int, default=None, help="override multiplex_width of the recipe (--compare: vs 1)"
    )
    p.add_argument("--max_steps", type=positive_int, default=None, help="override max_steps of the recipe")
    p.add_argument("--compare", action="store_true", help="run width 1 and width 3 from the same seed, one chart")
    args = p.parse_args(argv)
    if args.compare and args.width == 1:  # it was ignored: --compare always ran widths 1 and 3
        p.error("argument --width: --compare runs width 1 against --width (default 3), so give --width >= 2")
    return args


def read_recipe(path: Path) -> dict:
    """The recipe as a dict, or one line naming what is wrong with the file."""
    if not path.is_file():
        fail(
            f"recipe {path} not found." if not path.exists() else f"--recipe {path} is not a file: give a YAML recipe."
        )
    try:
        recipe = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        fail(f"--recipe {path}: cannot read it as YAML ({' '.join(str(error).split())}): fix the file.")
    if not isinstance(recipe, dict):
        fail(f"--recipe {path}: a recipe is a YAML mapping of training options, got {type(recipe).__name__}.")
    return recipe


def check_training_settings(recipe_path: Path, output: Path, runs: list[dict]) -> dict:
    """Parse and check the recipe with each run's overrides as the training script will, before any model loads (a
    bad value failed in the training subprocess, after the base model had loaded and generated). Returns the recipe's
    settings the report uses, with the training script's defaults filled in."""
    try:
        from .grpo import ConfigError, parse_args, validate
        from .rewards import get_reward_funcs
    except ImportError as error:
        fail(f"the project is not installed ({error}); run `make install`.")

    for overrides in runs:
        argv = ["--config", str(recipe_path), "--output_dir", str(output / f"K{overrides['multiplex_width']}")]
        for key, value in overrides.items():
            argv += [f"--{key}", str(value)]
        try:
            script_args, training_args, model_args = parse_args(argv)
            validate(script_args, training_args, model_args)
            get_reward_funcs(script_args.reward_funcs)
        except ValueError as error:  # ConfigError, an unknown reward name
            message = str(error) if isinstance(error, ConfigError) else " ".join(str(error).split())
            fail(f"--recipe {recipe_path}: {message}")
    return {
        "dataset_name": script_args.dataset_name,
        "dataset_config": script_args.dataset_config,
        "prompt_template": script_args.prompt_template,
        "seed": training_args.seed,
        "thinking_end": training_args.thinking_end,
        "max_thinking_tokens": training_args.max_thinking_tokens,
        "max_completion_length": training_args.max_completion_length,
        "temperature": training_args.temperature,
    }


def check_output(output: Path) -> None:
    """--output must be a folder this user can write (or create), checked before any model loads."""
    if output.exists() and not output.is_dir():
        fail(f"--output {output} is a file, not a folder: give a folder for the runs and the report.")
    existing = output
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        fail(f"--output {output}: {existing} is not a writable folder: give a folder you can write.")


def fail(message: str) -> None:
    print(f"make demo: {message}", file=sys.stderr)
    raise SystemExit(1)


def train(recipe: str, output_dir: Path, overrides: dict) -> list[dict]:
    """Launch one training run through accelerate; returns the trainer's log history."""
    if output_dir.exists():
        shutil.rmtree(output_dir)  # never mix a previous run's files into this report
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--cpu",
        "--quiet",  # a failed run's own error is the message: no CalledProcessError traceback of the launcher
        "-m",
        "multiplex_trl.grpo",
        "--config",
        recipe,
        "--output_dir",
        str(output_dir),
    ]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    print("$ " + " ".join(cmd[2:]).replace("accelerate.commands.launch", "accelerate launch"), flush=True)
    if subprocess.run(cmd).returncode != 0:
        fail(f"training failed (see above); {output_dir} is incomplete.")
    state = output_dir / "trainer_state.json"
    if not state.exists():
        fail(f"training finished without {state}.")
    return json.loads(state.read_text())["log_history"]


def held_out_problems(recipe: dict) -> list[dict]:
    """A few problems from the same task, drawn from the test seed (not trained on)."""
    import datasets

    from .data import load_prompts

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar for 4 prompts, on stderr before a one-line refusal
    try:
        ds = load_prompts(
            recipe["dataset_name"],
            dataset_config=recipe.get("dataset_config"),
            split="test",
            prompt_template=recipe.get("prompt_template"),
            max_samples=HELD_OUT,
            seed=recipe.get("seed", 0),
        )
    finally:
        if shown:
            datasets.enable_progress_bars()
    return [{"prompt": row["prompt"], "answer": row["answer"]} for row in ds]


def show_completions(model_path: str, recipe: dict, problems: list[dict], width: int) -> list[str]:
    """Markdown blocks: each held-out problem's multiplex completion with its branching positions."""
    from .inference import format_branches, generate, load_model
    from .rewards import accuracy_reward, set_thinking_end

    set_thinking_end(recipe["thinking_end"])  # grade the text after this recipe's marker, as training does
    model, tokenizer = load_model(model_path, device="cpu")  # once: generate and format_branches share it
    samples = generate(
        model,
        [p["prompt"] for p in problems],
        tokenizer=tokenizer,
        width=width,
        max_new_tokens=recipe["max_completion_length"],
        thinking_end=recipe["thinking_end"],
        max_thinking_tokens=recipe.get("max_thinking_tokens"),
        temperature=recipe.get("temperature"),
        seed=1234,
        num_samples=1,
    )
    blocks = []
    for problem, (sample,) in zip(problems, samples):
        score = accuracy_reward([[{"role": "assistant", "content": sample.text}]], answer=[problem["answer"]])[0]
        question = problem["prompt"][-1]["content"].split("\n")[0]
        blocks.append(
            f"**{question}** (answer {problem['answer']}; reward {score})\n\n"
            f"```\n{format_branches(sample, tokenizer)}\n```\n"
        )
    return blocks


def series(logs: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], h[key]) for h in logs if key in h]
    return [s for s, _ in points], [v for _, v in points]


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward", "reward (= accuracy)"),
        ("multiplex/branch_rate", "branch rate"),
        ("multiplex/thinking_length", "thinking length"),
        ("completions/mean_length", "completion length"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for name, logs in runs.items():
            steps, values = series(logs, key)
            if steps:
                ax.plot(steps, values, marker="o", ms=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_rows(name: str, logs: list[dict]) -> list[str]:
    steps, rewards = series(logs, "reward")
    _, branch = series(logs, "multiplex/branch_rate")
    _, think = series(logs, "multiplex/thinking_length")
    if not steps:
        return []
    half = max(1, len(rewards) // 2)
    first, last = sum(rewards[:half]) / half, sum(rewards[-half:]) / half
    return [
        f"| {name} | {len(steps)} | {first:.3f} | {last:.3f} | "
        f"{(sum(branch) / len(branch)) if branch else 0:.3f} | {(sum(think) / len(think)) if think else 0:.1f} |"
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    recipe_path = Path(args.recipe)
    recipe = read_recipe(recipe_path)
    output = Path(args.output)
    widths = [1, args.width or 3] if args.compare else [args.width or recipe.get("multiplex_width", 3)]
    runs_overrides = [
        {"multiplex_width": width, **({"max_steps": args.max_steps} if args.max_steps is not None else {})}
        for width in widths
    ]
    try:
        from .models import prepare_demo_model
    except ImportError as error:
        fail(f"the project is not installed ({error}); run `make install`.")
    # Everything that can be checked without a model is checked before one is converted or loaded.
    recipe = {**recipe, **check_training_settings(recipe_path, output, runs_overrides)}
    check_output(output)
    try:
        problems = held_out_problems(recipe)
    except ValueError as error:  # the recipe's dataset settings: one line, before any model loads
        fail(str(error))
    try:
        model_path = prepare_demo_model()
    except (ModuleNotFoundError, OSError) as error:
        fail(str(error))

    try:
        output.mkdir(parents=True, exist_ok=True)
        # A run that fails must not leave the last run's report and chart looking like its own.
        for stale in ("report.md", "training.png"):
            (output / stale).unlink(missing_ok=True)
    except OSError as error:
        fail(f"--output {output}: {error.strerror or error}: give a folder you can write.")
    report = [
        f"# Multiplex GRPO demo: {Path(model_path).name}\n",
        f"Recipe `{recipe_path}`; task `{recipe['dataset_name']}`; marker `{recipe['thinking_end']}` "
        f"(forced after {recipe.get('max_thinking_tokens')} thinking positions).\n",
    ]

    print(f"Before training: {len(problems)} held-out problems, width {max(widths)}", flush=True)
    before = show_completions(model_path, recipe, problems, max(widths))

    runs = {}
    for overrides in runs_overrides:
        width = overrides["multiplex_width"]
        name = "discrete (K=1)" if width == 1 else f"multiplex (K={width})"
        print(f"\n== Training {name}", flush=True)
        runs[name] = train(str(recipe_path), output / f"K{width}", overrides)

    trained = str(output / f"K{max(widths)}")
    print(f"After training: the same problems, width {max(widths)}", flush=True)
    after = show_completions(trained, recipe, problems, max(widths))

    report += [
        "## Training\n",
        "![training](training.png)\n",
        "| run | steps | mean reward, first half | mean reward, second half | branch rate | thinking length |",
        "|---|---|---|---|---|---|",
    ]
    for name, logs in runs.items():
        report += summary_rows(name, logs)
    report += [
        "",
        "Reward is the accuracy reward (math-verify on the text after the marker), per step, "
        "averaged over the step's completions. Branch rate: share of thinking positions whose K draws differ.",
        "",
        "## Completions before training\n",
        *before,
        "## Completions after training\n",
        *after,
        "Branching positions are shown as `[token:weight|token:weight]`: the distinct slots that were merged "
        "into that position's input embedding.",
    ]
    # Chart and report only once everything ran: a run stopped in the last step left this run's chart alone.
    plot(runs, output / "training.png")
    (output / "report.md").write_text("\n".join(report) + "\n")
    print("\n" + "\n".join(line for line in report if line.startswith("|")))
    print(f"\nReport: {output / 'report.md'} (chart: {output / 'training.png'}), {time.time() - start:.0f} s total.")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
