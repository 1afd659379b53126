"""report_to=wandb (offline): the multiplex metrics and the slot-0 completions table reach the run files."""

import glob
import json

import pytest
from grpo_run import tiny_run_args, write_jsonl

from multiplex_trl import grpo


pytestmark = pytest.mark.usefixtures("text_hash_reward")  # the `text_hash` reward of tests/grpo_run.py


def test_wandb_offline_gets_multiplex_metrics_and_slot0_completions(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = tiny_run_args(tiny_model_dir, write_jsonl(tmp_path / "data.jsonl"), tmp_path / "out")
    args[args.index("--report_to") + 1] = "wandb"
    grpo.main([*args, "--log_completions", "true", "--run_name", "multiplex-logging-test"])

    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = open(run_file, "rb").read()
    for metric in ("branch_rate", "distinct_per_step", "thinking_length", "closed_thinking_rate"):
        assert f"multiplex/{metric}".encode() in records
    tables = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "*.json")))
    assert tables, "log_completions wrote no completions table"
    table = json.load(open(tables[-1]))
    assert {"prompt", "completion", "advantage"} <= set(table["columns"])
    completion = table["data"][0][table["columns"].index("completion")]
    assert completion[0]["role"] == "assistant" and isinstance(completion[0]["content"], str)


def test_trackio_offline_gets_multiplex_metrics(tiny_model_dir, tmp_path, monkeypatch):
    import sqlite3

    pytest.importorskip("trackio", reason="trackio is installed by the test extra (make install)")
    monkeypatch.setattr("trackio.sqlite_storage.TRACKIO_DIR", tmp_path / "trackio")  # where the run's SQLite file goes
    args = tiny_run_args(tiny_model_dir, write_jsonl(tmp_path / "data.jsonl"), tmp_path / "out")
    args[args.index("--report_to") + 1] = "trackio"
    grpo.main([*args, "--project", "multiplex-logging-test"])

    (db,) = glob.glob(str(tmp_path / "trackio" / "multiplex-logging-test.db"))
    logged = [json.loads(row[0]) for row in sqlite3.connect(db).execute("select metrics from metrics")]
    keys = set().union(*logged)
    assert {"train/multiplex/branch_rate", "train/multiplex/thinking_length"} <= keys, sorted(keys)[:20]
