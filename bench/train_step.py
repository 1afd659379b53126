"""One training step (log-probs + loss + backward) of MultiplexGRPOTrainer vs TRL's GRPOTrainer on the same tokens.

The batch is generated once with `multiplex_generate` at K=`--width`, with unreachable EOS and end-of-thinking ids so
every completion has the full length and every position is a thinking position (K slots scored: the multiplex
pass's most expensive case). Each trainer then runs its own `_compute_loss` + `backward()` on it:
- `multiplex K=3`: MultiplexGRPOTrainer on the K slots and merge weights;
- `multiplex K=1`: MultiplexGRPOTrainer (multiplex_width=1) on slot 0 alone (the factorised pass without extra slots);
- `TRL GRPOTrainer`: TRL's fused-LM-head pass on slot 0 (the discrete tokens a K=1 rollout would have produced).
Gradients stay allocated between calls (they accumulate; the optimizer never steps), so the peak-memory increment is
what one step adds on top of weights + gradients.
Gradient checkpointing is on for every trainer, as `train()` turns it on with TRL's default GRPOConfig
(--no-gradient-checkpointing: off).

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_step.py                  # CPU defaults, < 3 min
    .venv/bin/python bench/train_step.py --device cuda --batch 16 --completion-len 1024
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import common
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from multiplex_trl import MultiplexGRPOConfig, MultiplexGRPOTrainer, multiplex_generate


# Default (batch, prompt length, completion length) per device and model. On a 2-core CPU a SmolLM2 step on a few
# hundred tokens takes seconds, so its CPU default is small enough for the script to stay under ~3 minutes.
SIZES = {
    "cpu": {"tiny": (8, 32, 128), "smollm2": (2, 16, 32)},
    "cuda": {"tiny": (16, 128, 512), "smollm2": (16, 128, 512)},
}


def _reward(completions, **kwargs):
    return [0.0] * len(completions)


def checkpoint_as_in_training(trainer) -> None:
    """Turn on activation (gradient) checkpointing the way `Trainer.train()` does when the config asks for it (TRL's
    GRPOConfig does by default). The bench calls `_compute_loss` directly, never `train()`, so without this the step
    would run without checkpointing: not the step a training run takes (other activation memory, no recompute)."""
    args = trainer.args
    if not args.activation_checkpointing:
        return
    kwargs = dict(args.activation_checkpointing_kwargs or {})
    every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
    trainer.model.activation_checkpointing_enable(
        activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload
    )


def build_trainers(
    model,
    tok,
    *,
    width: int,
    completion_len: int,
    batch: int,
    device,
    bf16: bool,
    out: str,
    gradient_checkpointing: bool = True,
):
    """{variant: trainer}, each on its own copy of `model` (float32 weights; bf16 means autocast, as in training),
    with gradient checkpointing on or off for all of them, as `train()` would set it."""
    common_args = {
        "output_dir": out,
        "per_device_train_batch_size": batch,
        "num_generations": 2,
        "max_completion_length": completion_len,
        "use_cpu": device.type == "cpu",
        "bf16": bf16,
        "report_to": "none",
        "beta": 0.0,
        "save_strategy": "no",
        "gradient_checkpointing": gradient_checkpointing,
    }
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}]] * batch})
    trainers = {}
    for name, cls, args in (
        (f"multiplex K={width}", MultiplexGRPOTrainer, MultiplexGRPOConfig(multiplex_width=width, **common_args)),
        ("multiplex K=1", MultiplexGRPOTrainer, MultiplexGRPOConfig(multiplex_width=1, **common_args)),
        ("TRL GRPOTrainer", GRPOTrainer, GRPOConfig(**common_args)),
    ):
        tr = cls(
            model=copy.deepcopy(model),
            reward_funcs=_reward,
            args=args,
            train_dataset=data,
            processing_class=tok,
        )
        tr.model.train()
        checkpoint_as_in_training(tr)
        tr.current_gradient_accumulation_steps = 1
        trainers[name] = tr
    return trainers


def make_batches(trainer, width: int, batch: int, prompt_len: int, completion_len: int, device, seed: int):
    """{variant: inputs} for `_compute_loss`: the same prompts and slot-0 tokens; K slots only for the K variant."""
    model = trainer.model
    unreachable = model.config.vocab_size
    prompts, mask = common.random_prompts(model.config.vocab_size, batch, prompt_len, device, seed)
    with torch.no_grad():
        r = multiplex_generate(
            model.eval(),
            prompts,
            mask,
            width=width,
            max_new_tokens=completion_len,
            thinking_end_ids=[unreachable],
            eos_token_ids=[unreachable],
            pad_token_id=trainer.processing_class.pad_token_id,
            generator=torch.Generator(device).manual_seed(seed),
        )
    model.train()
    assert r.ids.size(1) == completion_len and bool(r.thinking_mask.all())
    g = torch.Generator().manual_seed(seed)
    trl_inputs = {
        "prompt_ids": prompts,
        "prompt_mask": mask,
        "completion_ids": r.ids[..., 0],
        "completion_mask": torch.ones_like(r.ids[..., 0], dtype=torch.long),
        "advantages": torch.randn(batch, generator=g).to(device),
        "num_items_in_batch": torch.tensor(float(batch * completion_len), device=device),  # TRL's default "dapo"
    }
    one_hot = torch.ones_like(r.weights[..., :1])
    return {
        f"multiplex K={width}": {
            **trl_inputs,
            "multiplex_ids": r.ids,
            "multiplex_weights": r.weights,
            "thinking_mask": r.thinking_mask,
        },
        "multiplex K=1": {
            **trl_inputs,
            "multiplex_ids": r.ids[..., :1],
            "multiplex_weights": one_hot,
            "thinking_mask": r.thinking_mask,
        },
        "TRL GRPOTrainer": trl_inputs,
    }


def step_fn(trainer, inputs):
    def step():
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()

    return step


def resident_bytes(model) -> int:
    """Bytes of the weights and their gradients (what a step's peak sits on)."""
    return sum(p.numel() * p.element_size() * (2 if p.grad is not None else 1) for p in model.parameters())


def main():
    p = common.base_parser(__doc__, reps=5)  # steps of the tiny model take milliseconds: more rounds, steadier ratio
    p.add_argument("--batch", type=int, default=None, help="default: per device and model, see SIZES in this file")
    p.add_argument("--prompt-len", type=int, default=None, help="default: see SIZES")
    p.add_argument("--completion-len", type=int, default=None, help="default: see SIZES")
    p.add_argument("--width", type=int, default=3, help="the multiplex K")
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="every trainer steps with gradient checkpointing on, as a training run with TRL's default GRPOConfig does",
    )
    args = p.parse_args()
    device, dtype = common.setup(args, "train_step")
    if device.type == "cpu" and dtype != torch.float32:
        p.error("--dtype bfloat16 is for cuda (autocast); CPU runs float32")
    bf16 = dtype == torch.bfloat16
    k_name = f"multiplex K={args.width}"

    rows, skipped = [], []
    # float32 on the CPU: each trainer takes a copy and places it
    for model_name, model, tok, label in common.available_models(args, torch.device("cpu"), torch.float32, skipped):
        batch, prompt_len, completion_len = (
            a or d for a, d in zip((args.batch, args.prompt_len, args.completion_len), SIZES[device.type][model_name])
        )
        with tempfile.TemporaryDirectory() as out:
            trainers = build_trainers(
                model,
                tok,
                width=args.width,
                completion_len=completion_len,
                batch=batch,
                device=device,
                bf16=bf16,
                out=out,
                gradient_checkpointing=args.gradient_checkpointing,
            )
            inputs = make_batches(trainers[k_name], args.width, batch, prompt_len, completion_len, device, args.seed)
            steps = {name: step_fn(tr, inputs[name]) for name, tr in trainers.items()}
            times = common.time_interleaved(steps, reps=args.reps, warmup=args.warmup, device=device)
            peaks = {name: common.peak_memory(fn, device) for name, fn in steps.items()}
            for name, tr in trainers.items():
                row = {"model": label, "variant": name, "batch": batch, "prompt": prompt_len}
                row["grad ckpt"] = "on" if tr.model.is_activation_checkpointing else "off"
                row["completion"] = completion_len
                row["ms/step"] = 1e3 * common.median(times[name])
                row["time / TRL"] = common.paired_ratio(times[name], times["TRL GRPOTrainer"])
                row["time / TRL ±"] = common.ratio_spread(times[name], times["TRL GRPOTrainer"])
                row["peak MiB above weights+grads"] = peaks[name] / 2**20
                row["peak MiB incl. own weights+grads"] = (peaks[name] + resident_bytes(tr.model)) / 2**20
                row["increment / TRL"] = peaks[name] / max(peaks["TRL GRPOTrainer"], 1)
                row["peak / TRL"] = (peaks[name] + resident_bytes(tr.model)) / (
                    peaks["TRL GRPOTrainer"] + resident_bytes(trainers["TRL GRPOTrainer"].model)
                )
                if name == k_name:
                    row["targets"] = f"time {common.verdict(row['time / TRL'], 1.10)}"
                    row["targets"] += f", memory {common.verdict(row['increment / TRL'], 1.10)}"
                print({k: common._cell(v) for k, v in row.items()}, flush=True)
                rows.append(row)
            del trainers, steps, inputs
        del model

    columns = [
        "model",
        "variant",
        "grad ckpt",
        "batch",
        "prompt",
        "completion",
        "ms/step",
        "time / TRL",
        "time / TRL ±",
    ]
    columns += ["peak MiB above weights+grads", "increment / TRL", "peak MiB incl. own weights+grads", "peak / TRL"]
    columns += ["targets"]
    notes = [
        f"ms/step: median of {args.reps} interleaved rounds of `_compute_loss` + `backward()` (TRL's default loss "
        "'dapo', beta 0, entropies computed as TRL does; gradient checkpointing as in `train()`: TRL's default on, "
        "--no-gradient-checkpointing for off); time / TRL is the median of per-round ratios, ± half their "
        "range.",
        f"Every completion position is a thinking position, so {k_name} scores {args.width} slots everywhere.",
        f"targets for {k_name}: time / TRL <= 1.10 and peak-memory ratio <= 1.10 (issue 7), judged on the increment "
        "above weights+grads (the stricter of the two memory ratios).",
    ]
    if device.type == "cuda":
        notes.append("memory: torch.cuda.max_memory_allocated during one step minus memory_allocated before it.")
        if bf16:
            notes.append("bfloat16 = float32 weights with the trainers' bf16 autocast (bf16=True), as in training.")
    else:
        notes.append(
            "memory (CPU): peak live tensor bytes during one step above the level before it, from torch.profiler's "
            "memory events (every allocation and free, in order: what max_memory_allocated counts on CUDA); "
            "temporaries freed inside a single op are netted at that op."
        )
    common.write_results(
        args,
        args.name,
        "Train step: MultiplexGRPOTrainer vs GRPOTrainer",
        [("time and peak memory", rows, columns)],
        common.environment(device, dtype),
        notes,
        skipped,
    )


if __name__ == "__main__":
    main()
