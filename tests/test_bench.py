"""bench/: the measuring pieces are right, and every script runs end to end at tiny sizes (no timing is asserted)."""

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402


MiB = 1 << 20


def test_peak_memory_on_cpu_counts_live_bytes_not_allocations():
    """The CPU peak is the most tensor bytes alive at once (allocations net of frees, in order): here 4 MiB, while
    the allocations add up to 8 MiB."""

    def step():
        a = torch.empty(MiB, dtype=torch.uint8)
        b = torch.empty(2 * MiB, dtype=torch.uint8)
        del a
        c = torch.empty(MiB, dtype=torch.uint8)
        del b, c
        return torch.ones(4 * MiB, dtype=torch.uint8).sum()

    assert 4 * MiB <= common.peak_memory(step, torch.device("cpu")) < 4 * MiB + 4096

    def temporaries():  # x (4 MiB), x * 2 (4 MiB) and x * 2 + 1 (4 MiB) are alive together
        x = torch.ones(MiB, dtype=torch.float32)
        return (x * 2 + 1).sum()

    assert 12 * MiB <= common.peak_memory(temporaries, torch.device("cpu")) < 12 * MiB + 4096


def test_rounds_rotate_the_order_after_the_warmup():
    calls = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = common.time_interleaved(variants, reps=4, warmup=1, device=torch.device("cpu"))
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab" + "abc"  # warmup, then one rotation per round
    assert {name: len(ts) for name, ts in times.items()} == {"a": 4, "b": 4, "c": 4}


def test_ratios_pair_the_rounds():
    """The ratio is the median of per-round ratios (drift shared by a round cancels), not a ratio of medians."""
    num, den = [2.0, 4.0, 9.0], [1.0, 4.0, 3.0]  # per round: 2, 1, 3
    assert common.paired_ratio(num, den) == 2.0
    assert common.median(num) / common.median(den) == pytest.approx(4 / 3)
    assert common.ratio_spread(num, den) == 1.0
    assert common.verdict(1.05, 1.05) == "ok" and common.verdict(1.06, 1.05) == "MISS"


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


TINY = ["--models", "tiny", "--reps", "1", "--device", "cpu"]
ROLLOUT = ["rollout.py", "--batch-sizes", "2", "--prompt-len", "4", "--new-tokens", "4"]
SCRIPTS = {
    "rollout": (ROLLOUT, ["tokens/s and time ratios"]),
    "rollout-profile": ([*ROLLOUT, "--profile"], ["where the time goes"]),
    "rollout-fast": ([*ROLLOUT, "--fast"], ["tokens/s and time ratios against the eager loop"]),
    "train_step": (
        ["train_step.py", "--batch", "4", "--prompt-len", "4", "--completion-len", "8"],
        ["time and peak memory"],
    ),
    "scaling": (
        [
            "scaling.py",
            "--batch",
            "2",
            "--prompt-len",
            "4",
            "--lengths",
            "8,16",
            "--widths",
            "1,2",
            "--width-length",
            "8",
        ],
        ["completion length (multiplex K=3 vs generate)", "width K at length 8"],
    ),
    "grad_hooks": (["grad_hooks.py", "--batch-sizes", "2", "--steps", "3,6"], ["rollout time against one hook"]),
}
RATIOS = {  # the ratio columns each table must fill for every row
    "rollout": ["K3/K1", "K1/generate", "K3/generate"],
    "rollout-fast": ["static/eager", "compiled/eager"],
    "train_step": ["time / TRL", "peak / TRL"],
    "scaling": ["K3/generate"],
    "grad_hooks": ["after 3 steps / 1 hook", "after 6 steps / 1 hook"],
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_each_bench_script_writes_its_tables(name, tmp_path):
    """`make bench`'s scripts run at tiny sizes and write their JSON and Markdown to --results-dir, with every ratio
    filled in; the committed bench/results are left alone."""
    argv, headings = SCRIPTS[name]
    before = _digest(BENCH / "results")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCH / argv[0]), *argv[1:], *TINY, "--results-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _digest(BENCH / "results") == before
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    assert list(payload["tables"]) == headings and payload["skipped"] == []
    assert payload["environment"]["torch"] == torch.__version__
    markdown = (tmp_path / f"{name}.md").read_text()
    for heading, rows in payload["tables"].items():
        assert rows and f"## {heading}" in markdown
        for row in rows:
            numbers = [v for v in row.values() if isinstance(v, (int, float))]
            assert numbers and all(math.isfinite(v) and v >= 0 for v in numbers), row
    first = next(iter(payload["tables"].values()))
    for column in RATIOS.get(name, []):
        assert all(row[column] > 0 for row in first), column


def test_train_step_trainers_step_as_a_training_run_does(tmp_path):
    """Every trainer of bench/train_step.py steps with the settings `train()` would use: gradient checkpointing on as
    TRL's GRPOConfig defaults it (the bench calls `_compute_loss` directly, so nothing else turns it on), and the same
    loss settings for all three."""
    import train_step

    device = torch.device("cpu")
    model, tok, _ = common.load_model("tiny", device, torch.float32)
    sizes = {"width": 3, "completion_len": 4, "batch": 2, "device": device, "bf16": False, "out": str(tmp_path)}
    for checkpointing, off in ((True, {}), (False, {"gradient_checkpointing": False})):  # the default: on
        trainers = train_step.build_trainers(model, tok, **sizes, **off)
        assert [tr.model.is_activation_checkpointing for tr in trainers.values()] == [checkpointing] * 3
        settings = {
            (tr.loss_type, tr.beta, tr.num_iterations, tr.importance_sampling_level, tr.temperature, tr.epsilon_low)
            + (tr.epsilon_high, tr.top_entropy_quantile, tr.use_vllm, tr.args.cast_lm_head_to_fp32, tr.model.training)
            for tr in trainers.values()
        }
        assert len(settings) == 1, settings


def test_scaling_totals_are_timed_without_the_forward_clock_on_cuda(monkeypatch):
    """The forward clock synchronises the device at every forward: on a GPU the length sweep's totals come from plain
    calls, and only the separate '(clocked)' calls carry its syncs (two per forward). On a CPU one clocked call does
    both. Counted with a stand-in `common.sync` (the model stays on the CPU)."""
    import scaling
    from rollout import engines

    syncs = []
    monkeypatch.setattr(common, "sync", lambda device: syncs.append(device.type))
    model, _, _ = common.load_model("tiny", torch.device("cpu"), torch.float32)
    prompts, mask = common.random_prompts(model.config.vocab_size, 2, 4, "cpu")
    new_tokens = 5
    runs = engines(model, prompts, mask, width=3, new_tokens=new_tokens, seed=0)
    runs = {name: runs[name] for name in ("multiplex K=3", "generate")}

    forwards = {name: [] for name in runs}
    variants = scaling.sweep_variants(model, runs, forwards, torch.device("cuda"))
    assert set(variants) == {"multiplex K=3", "generate", "multiplex K=3 (clocked)", "generate (clocked)"}
    for name in runs:
        syncs.clear()
        variants[name]()
        assert syncs == [] and forwards[name] == []  # the timed call: no hook, no sync
        variants[f"{name} (clocked)"]()
        assert len(syncs) == 2 * new_tokens and len(forwards[name]) == 1  # prefill + new_tokens - 1 decode steps
    syncs.clear()
    variants["generate"]()
    assert syncs == []  # the clocked call removed its hooks

    forwards = {name: [] for name in runs}
    variants = scaling.sweep_variants(model, runs, forwards, torch.device("cpu"))
    assert set(variants) == set(runs)
    variants["multiplex K=3"]()
    assert len(forwards["multiplex K=3"]) == 1


# (script, what --help says of --reps, what it must not say): train_step and scaling run 5 rounds on every device.
REPS_HELP = [
    ("train_step.py", "(default: 5)", "3 on cpu"),
    ("scaling.py", "(default: 5)", "3 on cpu"),
    ("rollout.py", "(default: 3 on cpu, 5 on cuda)", "(default: 5)"),
]


@pytest.mark.parametrize("script, says, not_says", REPS_HELP, ids=[s for s, *_ in REPS_HELP])
def test_help_states_the_rounds_each_script_runs(script, says, not_says):
    """`--help` names the number of timed rounds the script really runs."""
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000"},  # one line per option
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (reps,) = [line for line in done.stdout.splitlines() if line.strip().startswith("--reps")]
    assert says in reps and not_says not in reps, reps
