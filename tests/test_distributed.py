"""Real `accelerate launch` runs of the training script with 2 CPU processes (gloo): DDP, ZeRO-2, ZeRO-3, ZeRO-3 + LoRA,
ZeRO-2 with the compiled static-cache decode step.

Each run trains the tiny model for 2 steps with the repo's own accelerate config (GPU settings overridden for CPU),
then checks that both ranks hold the same trained weights and that the saved model and checkpoint reload to them.
DeepSpeed JIT-builds one CPU op on first use (about a minute, more on a busy machine); TORCH_EXTENSIONS_DIR keeps it
under <repo>/.cache/torch_extensions between runs.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("grpo_run.py")
_spec = importlib.util.spec_from_file_location("grpo_run", RUNNER)
grpo_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grpo_run)

LORA = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]
RUNS = {  # name: (accelerate config, extra flags)
    "ddp": ("ddp.yaml", []),
    "zero2": ("zero2.yaml", []),
    "zero3": ("zero3.yaml", []),
    "zero3-lora": ("zero3.yaml", LORA),
    # the fast decode path: static cache + compiled step, exact with the trained weights on both ranks
    "zero2-compiled": ("zero2.yaml", ["--cache_implementation", "static", "--multiplex_compile", "true"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    config: str, flags: list[str], tmp_path: Path, tiny_model_dir: str, env_extra: dict | None = None
) -> tuple[Path, list[dict]]:
    """Run grpo_run.py under `accelerate launch` with 2 processes; return output_dir and each rank's record."""
    out, result = start(config, flags, tmp_path, tiny_model_dir, env_extra)
    assert result.returncode == 0, f"accelerate launch failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    ranks = sorted((tmp_path / "digests").glob("rank*.json"))
    assert [p.name for p in ranks] == ["rank0.json", "rank1.json"], "expected two training processes"
    return out, [json.loads(p.read_text()) for p in ranks]


def start(config, flags, tmp_path, tiny_model_dir, env_extra=None) -> tuple[Path, subprocess.CompletedProcess]:
    """`accelerate launch` grpo_run.py with 2 processes and the tiny run's flags plus `flags`: output_dir and result."""
    out, digests = tmp_path / "run", tmp_path / "digests"
    data = grpo_run.write_jsonl(tmp_path / "problems.jsonl")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "TOKENIZERS_PARALLELISM": "false",
        "CI": "true",  # no telemetry
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
        "GRPO_RUN_DIGESTS": str(digests),
        # The processes import the package of this checkout, installed or not.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **(env_extra or {}),
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "accelerate_configs" / config),
        # The configs are for GPUs: 2 processes, full precision, on CPU (the script's --use_cpu; gloo).
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
        str(RUNNER),
        *grpo_run.tiny_run_args(tiny_model_dir, data, out, "--save_steps", "2", *flags),
    ]  # fmt: skip
    return out, subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)


def assert_close(digest_a: dict, digest_b: dict, what: str):
    assert digest_a.keys() == digest_b.keys(), what
    for name in digest_a:
        for a, b in zip(digest_a[name], digest_b[name]):
            assert abs(a - b) <= 1e-6 * max(1.0, abs(a)), f"{what}: {name} differs ({a} vs {b})"


@pytest.mark.parametrize("run", RUNS, ids=RUNS.keys())
def test_two_processes_train_the_same_model(run, tmp_path, tiny_model_dir):
    config, flags = RUNS[run]
    out, ranks = launch(config, flags, tmp_path, tiny_model_dir)
    rank0, rank1 = ranks
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["losses"] == rank1["losses"] and len(rank0["losses"]) == 2
    assert rank0["weights"] == rank1["weights"], "the ranks hold different weights"
    for step, (a, b) in enumerate(zip(rank0["rollouts"], rank1["rollouts"], strict=True)):
        # TRL's metrics are means over every rank's rows: the multiplex ones too, not rank 0's own rollouts
        both = {k: a[k] + b[k] for k in a}
        expected = {
            "multiplex/branch_rate": both["branched"] / both["think"],
            "multiplex/distinct_per_step": both["distinct"] / both["think"],
            "multiplex/thinking_length": both["think"] / both["rows"],
            "multiplex/closed_thinking_rate": both["closed"] / both["rows"],
        }
        for rank in ranks:
            assert rank["metrics"][step] == pytest.approx(expected, rel=1e-6), (step, rank["metrics"][step], expected)
    if "--multiplex_compile" in flags:
        assert rank0["rollout_gap"] < 1e-5 and rank1["rollout_gap"] < 1e-5, (
            rank0["rollout_gap"],
            rank1["rollout_gap"],
        )
    assert (out / "multiplex_config.json").is_file() and (out / "checkpoint-2" / "multiplex_config.json").is_file()

    if "--use_peft" in flags:
        adapter = load_file(out / "adapter_model.safetensors")
        assert adapter and all(t.numel() > 0 for t in adapter.values()), "empty LoRA adapter (ZeRO-3 shards?)"
        assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in adapter.items()), "untrained"
        assert_close(grpo_run.weights_digest(adapter.items()), rank0["weights"], "saved adapter vs rank 0")
        checkpoint = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
        assert_close(grpo_run.weights_digest(checkpoint.items()), rank0["weights"], "checkpoint adapter vs rank 0")
        from peft import AutoPeftModelForCausalLM

        AutoPeftModelForCausalLM.from_pretrained(out / "checkpoint-2")  # reloads onto the base model
    else:
        for folder in (out, out / "checkpoint-2"):
            model = AutoModelForCausalLM.from_pretrained(folder)
            saved = grpo_run.weights_digest(model.named_parameters())
            assert_close(saved, rank0["weights"], f"{folder.name} vs rank 0")
        initial = grpo_run.weights_digest(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
        assert initial["lm_head.weight"] != rank0["weights"]["lm_head.weight"], "the weights never changed"


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, tiny_model_dir):
    """Only rank 1 is signalled (as when ranks are preempted separately): it stopped and saved alone while rank 0 went
    on into the next step's collectives, and gloo aborted the run with no checkpoint."""
    flags = ["--reward_funcs", "preempt_one_rank", "--max_steps", "50", "--save_steps", "1000"]
    out, result = start("ddp.yaml", flags, tmp_path, tiny_model_dir, {"GRPO_RUN_PREEMPT_RANK": "1"})
    log = result.stdout + result.stderr
    assert "collective mismatch" not in log and "EnforceNotMet" not in log, log[-3000:]
    assert "Stopped by SIGTERM at step 1" in result.stdout, log[-3000:]
    assert (out / "checkpoint-1" / "model.safetensors").is_file()
    assert not (out / "checkpoint-2").exists() and not (out / "model.safetensors").exists()
    assert not (tmp_path / "digests").exists()  # neither rank reached the final save
