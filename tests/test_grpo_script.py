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
    ],
    ids=["unknown key", "bad choice"],
)
def test_bad_recipe_is_refused(recipe, message, no_model, tiny_model_dir, data, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    with pytest.raises(grpo.ConfigError, match=message):
        grpo.main(["--config", str(path), *tiny_run_args(tiny_model_dir, data, tmp_path / "run")])


def test_bad_choice_flag_is_an_argparse_error(no_model, tiny_model_dir, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        grpo.main(tiny_run_args(tiny_model_dir, data, tmp_path / "run", "--multiplex_merge", "median"))
    assert exit.value.code == 2 and "invalid choice: 'median'" in capsys.readouterr().err


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
