"""The training script `multiplex_trl.grpo` and the `multiplex-trl` CLI: a real 2-step run in-process, and every bad
input refused in one line before a model is loaded."""

import json

import pytest
import torch
import yaml
from grpo_run import tiny_run_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from multiplex_trl import cli, grpo
from multiplex_trl.hub import SETTINGS_FILE, load_multiplex_settings


pytestmark = pytest.mark.usefixtures("text_hash_reward")  # the `text_hash` reward of tests/grpo_run.py


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything gets as far as loading a tokenizer or building the trainer (which loads the model)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the bad input was refused")

    monkeypatch.setattr(grpo, "MultiplexGRPOTrainer", refuse)
    monkeypatch.setattr(grpo.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_two_steps_from_a_recipe_save_a_reloadable_model_with_settings_and_card(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    args = tiny_run_args(tiny_model_dir, data, out)
    # The recipe sets max_steps 5 and the width; the flag after --config overrides the recipe's max_steps.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"max_steps": 5, "multiplex_width": 3, "multiplex_merge": "weighted"}))
    folder = grpo.main(["--config", str(recipe), *args])

    assert folder == str(out)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and not (out / "checkpoint-3").exists()
    assert any(e.get("grad_norm", 0) > 0 for e in state["log_history"]), "no step had a gradient"

    model = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    final = load_file(out / "model.safetensors")
    assert torch.equal(model.lm_head.weight, final["lm_head.weight"])
    assert not torch.equal(model.lm_head.weight, initial.lm_head.weight), "the saved model is the untrained one"
    assert torch.equal(
        load_file(out / "checkpoint-2" / "model.safetensors")["lm_head.weight"], final["lm_head.weight"]
    )

    expected = {
        "method": "multiplex_thinking",
        "paper": "https://arxiv.org/abs/2601.08808",
        "mixer": "multiplex",
        "merge": "weighted",
        "width": 3,
        "thinking_end": "</think>",
        "max_thinking_tokens": 8,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": None,
        "min_p": None,
    }
    for folder in (out, out / "checkpoint-1", out / "checkpoint-2"):
        assert (folder / SETTINGS_FILE).is_file(), folder
        assert load_multiplex_settings(folder) == expected
        card = (folder / "README.md").read_text()
        assert "## Multiplex Thinking" in card and "https://arxiv.org/abs/2601.08808" in card
        assert "| `width` | `3` |" in card and '| `thinking_end` | `"</think>"` |' in card
        assert "| `temperature` | `1.0` |" in card and '| `merge` | `"weighted"` |' in card
        assert card.count("## Multiplex Thinking") == 1
    assert "multiplex-thinking" in (out / "README.md").read_text()  # the trainer's tag in the card metadata
    # the final trainer_state.json in output_dir (the log history `make demo` reports and plots from)
    final_state = json.loads((out / "trainer_state.json").read_text())
    assert final_state["global_step"] == 2 and [e["step"] for e in final_state["log_history"] if "loss" in e] == [1, 2]


def test_settings_reader(tmp_path):
    assert load_multiplex_settings(tmp_path) is None
    (tmp_path / SETTINGS_FILE).write_text('{"width": 2}')
    assert load_multiplex_settings(tmp_path) == {"width": 2}
    assert load_multiplex_settings(tmp_path / SETTINGS_FILE) == {"width": 2}
    assert load_multiplex_settings("nobody/not-cached-anywhere") is None  # offline, not in the cache


BAD_INPUTS = {
    "missing model": (["--model_name_or_path", "/nonexistent/model"], "Model path '/nonexistent/model' does not"),
    "uncached hub model offline": (["--model_name_or_path", "nobody/no-such-model"], "HF_HUB_OFFLINE is set"),
    "unknown dataset": (["--dataset_name", "no-such-dataset"], "Unknown dataset 'no-such-dataset'"),
    "missing dataset file": (["--dataset_name", "/nonexistent/problems.jsonl"], "does not exist"),
    "unknown reward": (["--reward_funcs", "acuracy"], "Unknown reward function 'acuracy'"),
    "unimportable reward": (["--reward_funcs", "no_such_pkg.fn"], "Cannot import reward function"),
    "reward weights": (["--reward_weights", "1.0", "2.0"], "reward_weights has 2 values"),
    "push offline": (["--push_to_hub", "true"], "HF_HUB_OFFLINE is set"),
    "push revisions offline": (["--push_revisions", "true"], "HF_HUB_OFFLINE is set"),
    "merge without LoRA": (["--push_merged", "true"], "push_merged=True merges a LoRA adapter"),
    "unknown flag": (["--multiplex_widht", "3"], "multiplex_widht"),
    "bad width": (["--multiplex_width", "0"], "multiplex_width must be an integer >= 1"),
    "no step": (  # TRL drops an incomplete prompt batch: the run saved the untrained model and exited 0
        ["--max_train_samples", "1", "--per_device_train_batch_size", "8"],
        "the dataset has 1 prompts but one generation batch takes 2",
    ),
    "reward column": (
        ["--reward_funcs", "reasoning_gym"],
        "reward 'reasoning_gym' needs the dataset column 'rg_entry'",
    ),
    "missing checkpoint": (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], "is not a folder"),
    # The Trainer refused it only after the model had loaded ("Can't find a valid checkpoint"), as a traceback.
    "not a checkpoint": (
        ["--resume_from_checkpoint", "."],
        "'.' is not a checkpoint \\(it has no trainer_state.json\\)",
    ),
    "nothing to resume": (["--resume_from_checkpoint", "true"], "resume_from_checkpoint=true: output_dir .* has no"),
}


@pytest.mark.parametrize("flags, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_refused_before_the_model_loads(flags, message, no_model, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(grpo.ConfigError, match=message) as error:
        grpo.main(tiny_run_args(tiny_model_dir, data, out, *flags))
    assert "\n" not in str(error.value)
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("multiplex_width: 3\nthinking_budget: 64\n", "Unknown arguments from config file.*thinking_budget"),
        # argparse checks `choices` only for flags; a recipe value is checked by the config itself.
        ("multiplex_merge: median\n", "multiplex_merge must be one of"),
        # YAML values keep their type (argparse converts strings only)
        ("reward_funcs: text_hash\n", r"reward_funcs must be a list of names, e.g. \['accuracy'\], got 'text_hash'"),
        ("reward_weights: 2\n", "reward_weights must be a list of numbers"),
        ("dataset_name: 5\n", "dataset_name must be a string, got 5"),
        ("multiplex_width: [3\n", "--config: the recipe is not valid YAML"),
        # These reached the config unconverted: a TypeError traceback, or (max_steps, report_to) a failure once the
        # model had loaded.
        ("max_steps: 2.5\n", "max_steps must be an integer, got 2.5"),
        ("temperature: [0.7]\n", r"temperature must be a number, got \[0.7\]"),
        ("num_generations: null\n", "num_generations must be an integer >= 2"),
        ("report_to: wandbb\n", "report_to 'wandbb' is not a logging integration"),
    ],
    ids=[
        "unknown key",
        "bad choice",
        "one reward name",
        "one weight",
        "number for a name",
        "bad yaml",
        "float for an int",
        "list for a float",
        "null for an int",
        "unknown integration",
    ],
)
def test_bad_recipe_is_refused(recipe, message, no_model, tiny_model_dir, data, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    with pytest.raises(grpo.ConfigError, match=message) as error:
        args = tiny_run_args(tiny_model_dir, data, tmp_path / "run")
        flag = f"--{recipe.split(':')[0]}"
        if flag in args:  # the recipe's value, not the flag's
            i = args.index(flag)
            del args[i : i + 2]
        grpo.main(["--config", str(path), *args])
    assert "\n" not in str(error.value)


def test_missing_recipe_is_one_line(no_model, tiny_model_dir, data, tmp_path):
    with pytest.raises(grpo.ConfigError, match="--config: cannot read the recipe: .*No such file"):
        grpo.main(["--config", str(tmp_path / "nope.yaml"), *tiny_run_args(tiny_model_dir, data, tmp_path / "run")])


def test_a_finished_output_dir_is_refused_unless_overwritten(no_model, tiny_model_dir, data, tmp_path):
    """A rerun into a finished run's folder that then crashed left the old weights beside the new settings."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old weights")
    with pytest.raises(grpo.ConfigError, match="holds a finished run \\(model.safetensors\\).*--overwrite_output_dir"):
        grpo.main(tiny_run_args(tiny_model_dir, data, out))
    assert (out / "model.safetensors").exists()
    with pytest.raises(AssertionError, match="a model or tokenizer was loaded"):  # past the cheap checks: `no_model`
        grpo.main(tiny_run_args(tiny_model_dir, data, out, "--overwrite_output_dir", "true"))
    assert (out / "model.safetensors").exists()  # deleted only once the marker is checked with the tokenizer


class TrainerBuilt(Exception):
    """Raised by the stand-in trainer: the script got as far as building it."""


def test_overwrite_deletes_the_finished_run_only_once_every_check_passed(tiny_model_dir, data, tmp_path, monkeypatch):
    """--overwrite_output_dir deleted the finished run before the marker was checked with the tokenizer: a refused
    marker then stopped the new run, and the old one was gone."""

    def build(*args, **kwargs):
        assert not out.exists(), "the new run starts in a folder that still holds the old one"
        raise TrainerBuilt

    monkeypatch.setattr(grpo, "MultiplexGRPOTrainer", build)
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old weights")
    flags = ["--overwrite_output_dir", "true", "--thinking_end", "\u00a7"]
    with pytest.raises(grpo.ConfigError, match="thinking_end='\u00a7' cannot be encoded"):
        grpo.main(tiny_run_args(tiny_model_dir, data, out, *flags))
    assert (out / "model.safetensors").read_bytes() == b"old weights"
    with pytest.raises(TrainerBuilt):
        grpo.main(tiny_run_args(tiny_model_dir, data, out, *flags[:2]))


def test_model_loading_options_reach_the_trainer(tiny_model_dir, data, tmp_path, monkeypatch):
    """--dtype (bfloat16 in the paper recipes) and --model_revision load the model, and a model_init_kwargs entry of
    the recipe is kept, not replaced by the script's unset default for it."""
    seen = {}

    def record(model, args, **kwargs):
        seen.update(model=model, init=dict(args.model_init_kwargs))
        raise TrainerBuilt

    monkeypatch.setattr(grpo, "MultiplexGRPOTrainer", record)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model_init_kwargs": {"attn_implementation": "sdpa"}}))
    flags = ["--dtype", "bfloat16", "--model_revision", "v1"]
    with pytest.raises(TrainerBuilt):
        grpo.main(["--config", str(recipe), *tiny_run_args(tiny_model_dir, data, tmp_path / "run", *flags)])
    assert seen["model"] == str(tiny_model_dir)
    assert seen["init"] == {
        "dtype": "bfloat16",
        "revision": "v1",
        "attn_implementation": "sdpa",
        "trust_remote_code": False,
    }


@pytest.mark.parametrize(
    "given, expected",
    [(["q_proj"], ["q_proj"]), (["q_proj", "v_proj"], ["q_proj", "v_proj"]), (["all-linear"], "all-linear")],
    ids=["one name", "two names", "all-linear"],
)
def test_one_lora_target_module_is_a_name_not_a_regex(given, expected, tiny_model_dir, data, tmp_path, monkeypatch):
    """TRL's ModelConfig turns a single --lora_target_modules value (or a recipe's string) into a string, which peft
    matches as a regex against the whole module name: `q_proj` alone matched nothing and failed after the model
    loaded. A plain name goes to peft as a one-name list (matched as a suffix); `all-linear` keeps its meaning."""
    from peft import LoraConfig, get_peft_model

    seen = {}

    def record(model, args, peft_config=None, **kwargs):
        seen["peft"] = peft_config
        raise TrainerBuilt

    monkeypatch.setattr(grpo, "MultiplexGRPOTrainer", record)
    flags = ["--use_peft", "true", "--lora_target_modules", *given]
    with pytest.raises(TrainerBuilt):
        grpo.main(tiny_run_args(tiny_model_dir, data, tmp_path / "run", *flags))
    targets = seen["peft"].target_modules
    assert targets == expected or sorted(targets) == sorted(expected)
    if given == ["q_proj"]:  # peft finds the tiny model's q_proj layers with it
        lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(target_modules=targets))
        assert any("q_proj" in name and "lora_A" in name for name, _ in lora.named_parameters())


def test_a_dataset_of_exactly_one_generation_batch_is_accepted(no_model, tiny_model_dir, data, tmp_path):
    """Two prompts and a generation batch of 8 completions (2 prompts x 4): one step can run."""
    flags = ["--max_train_samples", "2", "--per_device_train_batch_size", "8"]
    with pytest.raises(AssertionError, match="a model or tokenizer was loaded"):  # past every check: `no_model`
        grpo.main(tiny_run_args(tiny_model_dir, data, tmp_path / "run", *flags))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--multiplex_merge", "median"], "argument --multiplex_merge/--multiplex-merge: invalid choice: 'median'"),
        (["--multiplex_width", "three"], "argument --multiplex_width/--multiplex-width: invalid int value: 'three'"),
    ],
    ids=["choice", "type"],
)
def test_bad_flag_value_is_one_line_not_the_usage(flags, message, no_model, tiny_model_dir, data, tmp_path, capsys):
    """argparse printed its usage (every option: about 225 lines) before the message."""
    status = cli.main(["grpo", *tiny_run_args(tiny_model_dir, data, tmp_path / "run", *flags)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith(f"multiplex-trl grpo: error: {message}") and "\n" not in err


def test_cli_prints_configuration_errors_as_one_line(no_model, tiny_model_dir, data, tmp_path, capsys):
    status = cli.main(["grpo", *tiny_run_args(tiny_model_dir, data, tmp_path / "run", "--dataset_name", "nope")])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("multiplex-trl grpo: error: Unknown dataset 'nope'") and "\n" not in err


def test_cli_commands(monkeypatch, capsys):
    assert cli.main([]) == 2 and "usage: multiplex-trl" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    help = capsys.readouterr().out
    assert all(f"  {command} " in help for command in ("grpo", "generate", "eval"))
    assert cli.main(["train"]) == 2 and "unknown command 'train'" in capsys.readouterr().err
    # A command whose module is not installed says so in one line.
    monkeypatch.setitem(cli.COMMANDS, "generate", ("multiplex_trl._not_written_yet", "decode"))
    assert cli.main(["generate", "--model", "x"]) == 2
    assert capsys.readouterr().err.strip() == (
        "multiplex-trl: error: the 'generate' command is not available (multiplex_trl._not_written_yet is missing)."
    )


def test_sigterm_saves_a_checkpoint_but_no_finished_run(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    """A preempted run saved its checkpoint, then went on to the final save (and push) as if it had finished."""
    import os
    import signal

    from grpo_run import text_hash_reward

    from multiplex_trl import rewards

    def preempting_reward(completions, **kwargs):  # SIGTERM arrives during the first step
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return text_hash_reward(completions)

    sent, before = [], signal.getsignal(signal.SIGTERM)
    monkeypatch.setitem(rewards.REWARD_FUNCS, "preempting", preempting_reward)
    out = tmp_path / "run"
    status = cli.main(["grpo", *tiny_run_args(tiny_model_dir, data, out, "--reward_funcs", "preempting")])
    assert status == grpo.PREEMPTED_EXIT
    assert (out / "checkpoint-1" / "model.safetensors").is_file() and not (out / "checkpoint-2").exists()
    assert not (out / "model.safetensors").exists()  # nothing that looks like a finished run
    assert f"Stopped by SIGTERM at step 1: resume with --resume_from_checkpoint {out / 'checkpoint-1'}" in (
        capsys.readouterr().out
    )
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored after training


def test_resume_from_checkpoint_true_and_false(tiny_model_dir, data, tmp_path):
    """As strings (all a flag or recipe can give) both reached the Trainer and failed after the model loaded:
    "true" resumes from output_dir's last checkpoint, "false" starts afresh."""
    out = tmp_path / "run"
    grpo.main(tiny_run_args(tiny_model_dir, data, out, "--resume_from_checkpoint", "false"))
    first = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    grpo.main(tiny_run_args(tiny_model_dir, data, out, "--resume_from_checkpoint", "true", "--max_steps", "3"))
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert history[:2] == first[:2]  # steps 1-2 come from the checkpoint, not from a new run
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]


@pytest.mark.parametrize(
    "flags, changed",
    [
        (["--multiplex_width", "2"], "width 3 -> 2"),
        (["--max_thinking_tokens", "6", "--temperature", "0.7"], "max_thinking_tokens 8 -> 6, temperature 1.0 -> 0.7"),
    ],
    ids=["width", "budget and temperature"],
)
def test_resuming_with_other_multiplex_settings_is_refused(flags, changed, no_model, tiny_model_dir, data, tmp_path):
    """A checkpoint resumed with another width or rollout setting went on as another method under the same run (and
    its multiplex_config.json then described only the second half): refused in one line naming what changed."""
    from multiplex_trl import MultiplexGRPOConfig
    from multiplex_trl.hub import save_multiplex_settings

    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    trained = MultiplexGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_thinking_tokens=8)
    save_multiplex_settings(checkpoint, trained)
    args = tiny_run_args(tiny_model_dir, data, tmp_path / "run", "--resume_from_checkpoint", str(checkpoint))
    with pytest.raises(grpo.ConfigError, match=f"other multiplex settings \\({changed}\\): resume with") as error:
        grpo.main([*args, *flags])
    assert "\n" not in str(error.value)
    with pytest.raises(AssertionError, match="a model or tokenizer was loaded"):  # the same settings: past the check
        grpo.main(args)


def test_a_marker_the_tokenizer_cannot_encode_is_one_line(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    """Checked by the trainer before it loads the model, but as a traceback; the script checks it with the tokenizer."""

    def refuse(*args, **kwargs):
        raise AssertionError("the trainer was built before the marker was checked")

    monkeypatch.setattr(grpo, "MultiplexGRPOTrainer", refuse)
    status = cli.main(["grpo", *tiny_run_args(tiny_model_dir, data, tmp_path / "run", "--thinking_end", "§")])
    err = capsys.readouterr().err  # after the datasets progress bar
    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("multiplex-trl grpo: error: thinking_end='§' cannot be encoded")


def test_a_special_token_marker_is_one_line_before_the_model_loads(
    tiny_model_dir, data, tmp_path, monkeypatch, capsys
):
    """A marker the tokenizer marks special never reaches the rewards (TRL decodes with skip_special_tokens=True), so
    every reward would be 0: refused by the script in one line, before the trainer or the model."""
    import shutil

    from transformers import AutoTokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("the trainer was built before the marker was checked")

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["[/THINK]"]})
    tokenizer.save_pretrained(model_dir)
    monkeypatch.setattr(grpo, "MultiplexGRPOTrainer", refuse)
    status = cli.main(["grpo", *tiny_run_args(model_dir, data, tmp_path / "run", "--thinking_end", "[/THINK]")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("multiplex-trl grpo: error: thinking_end='[/THINK]' is a special")


def test_cli_shows_a_missing_dependency_and_restores_argv(monkeypatch, tmp_path, capsys):
    """A command whose own module is there but imports a missing package raises that import error (not 'command not
    available'); the program name argparse shows is restored after a command runs."""
    import sys

    (tmp_path / "broken_command.py").write_text("import no_such_dependency_xyz  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "broken", ("broken_command", "a command with a missing dependency"))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        cli.main(["broken"])
    (tmp_path / "echo_command.py").write_text("import sys\n\ndef main(argv):\n    print(sys.argv[0], argv)\n")
    monkeypatch.setitem(cli.COMMANDS, "echo", ("echo_command", "prints its program name"))
    program = sys.argv[0]
    assert cli.main(["echo", "--x"]) == 0 and sys.argv[0] == program
    assert capsys.readouterr().out == "multiplex-trl echo ['--x']\n"


def test_compile_with_a_window_the_completion_overflows_is_refused_before_the_model_loads(
    no_model, tok, data, tmp_path
):
    """A sliding window shorter than one token plus max_completion_length makes the compiled step recompile at every
    position: the trainer refused it only once the model had loaded (a traceback, after --overwrite_output_dir had
    deleted the finished run); the script reads the window from the model's config first."""
    from multiplex_trl.testing import tiny_model

    model_dir = tmp_path / "windowed"
    tiny_model(tok, sliding_window=8).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    fast = ["--cache_implementation", "static", "--multiplex_compile", "true"]
    with pytest.raises(grpo.ConfigError, match=r"sliding window \(8\).*multiplex_compile=False") as error:
        grpo.main(tiny_run_args(model_dir, data, tmp_path / "run", *fast))
    assert "\n" not in str(error.value)
    with pytest.raises(AssertionError, match="a model or tokenizer was loaded"):  # the static cache alone is fine
        grpo.main(tiny_run_args(model_dir, data, tmp_path / "run", *fast[:2]))
