"""Shared pieces of the benchmarks: devices, models, interleaved timing, peak memory, result tables.

Every script compares variants measured in the same process: one warmup call each, then `reps` rounds that call every
variant once (the order rotates each round, so no variant always runs first), timed with the device synchronised.
A variant's time is the median over rounds; a ratio is the median of the per-round ratios (rounds run back to back,
so pairing them cancels most of the drift of a shared machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402


RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("tiny", "smollm2")


class Skip(Exception):
    """A row that cannot run here (e.g. the demo model is not installed); the message says why."""


# --- command line -----------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def str_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def base_parser(doc: str, reps: int | None = None) -> argparse.ArgumentParser:
    """Flags every script shares; scripts add their own sizes. `reps`: the script's own number of rounds on every
    device (None: 3 on cpu, 5 on cuda)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda, float32 on cpu), float32 or bfloat16")
    p.add_argument("--models", type=str_list, default=None, help=f"comma list of {MODELS}")
    # A script's own default shows as argparse's "(default: N)"; the per-device one only where it applies.
    per_device = " (default: 3 on cpu, 5 on cuda)" if reps is None else ""
    p.add_argument("--reps", type=int, default=reps, help="timed rounds per variant" + per_device)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant before the rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="results file stem (default: the script name, plus '-cuda' on cuda)")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="folder for the .json and .md results")
    p.add_argument(
        "--smollm2-config",
        default=None,
        help="where the SmolLM2 weights are not installed: a folder with its config and tokenizer only; the "
        "architecture is built with random weights (speed and memory do not depend on the weight values)",
    )
    return p


def setup(args: argparse.Namespace, script: str, models: dict | None = None) -> tuple[torch.device, torch.dtype]:
    """Resolve device and dtype, pin CPU threads to $OMP_NUM_THREADS, fill in per-device defaults.

    `models` maps a device type to the default model list (else every model in MODELS).
    """
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if device.type == "cpu" and os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.reps is None:
        args.reps = 5 if device.type == "cuda" else 3
    if args.models is None:
        args.models = list((models or {}).get(device.type, MODELS))
    if args.name is None:
        args.name = script + ("-cuda" if device.type == "cuda" else "")
    return device, dtype


def on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


# --- models -------------------------------------------------------------------------------------------------------


def available_models(args, device: torch.device, dtype: torch.dtype, skipped: list[str]):
    """Yield (name, model, tokenizer, label) for each of `args.models`; a missing one is printed and added to `skipped`."""
    for name in args.models:
        try:
            model, tok, label = load_model(name, device, dtype, args.smollm2_config)
        except Skip as e:
            print(f"skip {name}: {e}")
            skipped.append(f"{name}: {e}")
            continue
        yield name, model, tok, label


def load_model(name: str, device: torch.device, dtype: torch.dtype, smollm2_config: str | None = None):
    """(model in eval mode, tokenizer, label) for `name` in MODELS; raises Skip when the model is not available.

    With `smollm2_config` (a folder with config and tokenizer), a missing SmolLM2 is built with random weights and
    labelled so.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name == "tiny":
        from multiplex_trl.testing import tiny_model, tiny_tokenizer

        tok = tiny_tokenizer()
        model, label = tiny_model(tok, max_positions=4096), name  # room for bench/scaling.py's 2048 tokens
    elif name == "smollm2":
        try:
            path, label = demo_model_path(), name
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except Skip:
            if smollm2_config is None:
                raise
            path, label = smollm2_config, "smollm2 (random weights)"
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    else:
        raise ValueError(f"--models: unknown model {name!r}, expected one of {MODELS}")
    return model.to(device=device, dtype=dtype).eval(), tok, label


def demo_model_path() -> str:
    """Path of the converted SmolLM2-135M-Instruct folder, or Skip with the reason."""
    try:
        from multiplex_trl.models import prepare_demo_model
    except ImportError as e:
        raise Skip(f"multiplex_trl.models.prepare_demo_model is not available yet ({e})") from e
    try:
        return prepare_demo_model()
    except (ImportError, FileNotFoundError) as e:
        raise Skip(f"SmolLM2-135M-Instruct cannot be prepared: {e}") from e


def random_prompts(vocab: int, batch: int, length: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded random prompts [B, P] and their all-ones attention mask: every row does the same work."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    return ids.to(device), torch.ones_like(ids).to(device)


# --- timing -------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    variants: dict[str, Callable[[], object]], *, reps: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each variant, `reps` rounds, rotating order; warmup calls first."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            start = time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


class ForwardClock:
    """Seconds spent inside `model`'s forward (pre/post hooks, device synchronised at both), summed until `take()`.

    With it, a rollout's time splits into the model's forward and the loop around it (sampling, bookkeeping, cache and
    mask updates). Use as a context manager: the hooks are removed on exit.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device, self.seconds, self._start, self._handles = model, device, 0.0, 0.0, []

    def __enter__(self) -> "ForwardClock":
        self._handles = [self.model.register_forward_pre_hook(self._pre), self.model.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _pre(self, module, args):
        sync(self.device)
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        sync(self.device)
        self.seconds += time.perf_counter() - self._start

    def take(self) -> float:
        """Forward seconds since the last take(), and restart the count."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def timed(self, run: Callable[[], object], record: list[float]) -> Callable[[], object]:
        """`run`, appending each call's forward seconds to `record` (warmup calls included: they come first)."""

        def call():
            self.take()
            run()
            record.append(self.take())

        return call


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-round ratios num[r] / den[r]."""
    return statistics.median(a / b for a, b in zip(num, den))


def ratio_spread(num: list[float], den: list[float]) -> float:
    """Half the range of the per-round ratios num[r] / den[r]: the round-to-round noise of `paired_ratio`."""
    ratios = [a / b for a, b in zip(num, den)]
    return (max(ratios) - min(ratios)) / 2


# --- peak memory --------------------------------------------------------------------------------------------------


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensor memory above the level before one call of `fn`.

    CUDA: the caching allocator's counters (`max_memory_allocated`). CPU: the same quantity from torch.profiler's
    memory events (every allocation and free of the CPU allocator, in order), so it is as exact and repeatable as on
    CUDA; only temporaries freed inside a single op are netted at that op. Call it after all timing: profiling is slow.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in deltas:  # an op's own allocations net of its own frees ('[memory]' events: frees between ops)
        live += delta
        peak = max(peak, live)
    return peak


# --- results ------------------------------------------------------------------------------------------------------


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers
    import trl

    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }
    if device.type == "cpu":
        env["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return env


def _cell(value) -> str:
    if isinstance(value, float):
        if abs(value) < 10:
            return f"{value:.3f}"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_results(
    args: argparse.Namespace,
    name: str,
    title: str,
    tables: list[tuple[str, list[dict], list[str]]],
    env: dict,
    notes: list[str],
    skipped: list[str],
) -> None:
    """Print the tables and write <args.results_dir>/<name>.json and .md. `tables` holds (heading, rows, columns)."""
    out = args.results_dir
    out.mkdir(parents=True, exist_ok=True)
    parts = [
        f"# {title}",
        "",
        "`" + env["command"] + "` on " + ", ".join(f"{k}={v}" for k, v in env.items() if k != "command"),
        "",
    ]
    for heading, rows, columns in tables:
        parts += [f"## {heading}", "", markdown_table(rows, columns), ""]
    if skipped:
        parts += ["Skipped:", ""] + [f"- {s}" for s in skipped] + [""]
    if notes:
        parts += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    text = "\n".join(parts)
    print(text)
    (out / f"{name}.md").write_text(text)
    payload = {"title": title, "environment": env, "tables": {h: rows for h, rows, _ in tables}, "skipped": skipped}
    payload["notes"] = notes
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out / name}.json and .md")


def verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "MISS"
