"""Shared by the training-script tests: tiny runs of `multiplex_trl.grpo`, in-process or under `accelerate launch`.

As a script (`accelerate launch tests/grpo_run.py <grpo flags>`) it runs `multiplex_trl.grpo` with two test hooks:
a reward with a guaranteed spread (so every step has a gradient), and each rank's trained weights written as a
digest to $GRPO_RUN_DIGESTS/rank<N>.json just before the model is saved.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import zlib


def text_hash_reward(completions, **kwargs) -> list[float]:
    """A deterministic reward in {0, .25, .5, .75, 1} that differs between completions: groups never tie."""
    from multiplex_trl.rewards import completion_text

    return [(zlib.crc32(completion_text(c).encode()) % 5) / 4 for c in completions]


_PREEMPTED: list[bool] = []


def preempt_one_rank_reward(completions, **kwargs) -> list[float]:
    """`text_hash`, but the process of rank $GRPO_RUN_PREEMPT_RANK sends itself SIGTERM at its first call: one rank
    of the run is preempted, the others are not."""
    import signal

    if os.environ.get("RANK") == os.environ.get("GRPO_RUN_PREEMPT_RANK") and not _PREEMPTED:
        _PREEMPTED.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
    return text_hash_reward(completions)


def register_test_reward() -> None:
    from multiplex_trl import rewards

    rewards.REWARD_FUNCS["text_hash"] = text_hash_reward
    rewards.REWARD_FUNCS["preempt_one_rank"] = preempt_one_rank_reward


def write_jsonl(path) -> str:
    """Eight tiny arithmetic problems in the local-file format `load_prompts` reads."""
    with open(path, "w") as f:
        for i in range(8):
            f.write(json.dumps({"problem": f"{i}+{i}=?", "answer": str(2 * i)}) + "\n")
    return str(path)


def tiny_run_args(model_dir, data, output_dir, *extra: str) -> list[str]:
    """Flags for a 2-step CPU run on the tiny model (4 completions of <= 16 tokens per step), then `extra`."""
    return [
        "--model_name_or_path", str(model_dir),
        "--dataset_name", str(data),
        "--output_dir", str(output_dir),
        "--reward_funcs", "text_hash",
        "--max_steps", "2",
        "--per_device_train_batch_size", "4",
        "--num_generations", "4",
        "--max_completion_length", "16",
        "--max_thinking_tokens", "8",
        "--learning_rate", "1e-2",
        "--save_steps", "1",
        "--logging_steps", "1",
        "--use_cpu", "true",
        "--bf16", "false",
        "--activation_checkpointing", "false",
        "--report_to", "none",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def digest(tensor) -> list[float]:
    """Three float64 sums that tell two tensors apart (bit-identical tensors give identical digests)."""
    t = tensor.detach().double()
    return [t.sum().item(), t.abs().sum().item(), (t * t).sum().item()]


def weights_digest(named_tensors) -> dict[str, list[float]]:
    """Digest per tensor, keyed by the name it is saved under (PEFT's '.default' adapter name dropped)."""
    return {name.replace(".default", ""): digest(t) for name, t in named_tensors}


def trained_weights_digest(trainer) -> dict[str, list[float]]:
    """Digest of this rank's trainable weights (all of them, or the LoRA ones); gathers ZeRO-3 shards (collective)."""
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for _, p in named):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with gather:
        return weights_digest(named)


def rollout_gap(trainer) -> float | None:
    """Static-cache runs: max |stored - teacher-forced| log-prob of one rollout with this rank's trained weights (a
    decode step that kept stale weights, e.g. a compiled one, shows here); None otherwise."""
    if trainer.args.cache_implementation != "static":
        return None
    import torch
    from conftest import recompute

    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    tok = trainer.processing_class
    batch = tok(["1+1=?", "what is 2+2?"], padding=True, return_tensors="pt").to(trainer.accelerator.device)
    with torch.no_grad():
        r = trainer._multiplex_generate(model, batch.input_ids, batch.attention_mask)
        recomputed = recompute(model, batch.input_ids, batch.attention_mask, r, temperature=trainer.temperature)
    return (recomputed - r.logprobs).abs().max().item()


_ROLLOUTS: list[dict] = []


def record_rollouts() -> None:
    """Count each training rollout's thinking positions, their distinct slots, branched positions, rows and rows that
    closed thinking themselves, by hand (Python sets), to check the logged `multiplex/*` metrics against."""
    from multiplex_trl import MultiplexGRPOTrainer

    generate = MultiplexGRPOTrainer._multiplex_generate

    def recorded(self, *args, **kwargs):
        rollout = generate(self, *args, **kwargs)
        if self.model.training:
            counts = {"think": 0, "distinct": 0, "branched": 0, "rows": rollout.ids.size(0), "closed": 0}
            for ids, think, closed, forced in zip(
                rollout.ids.tolist(), rollout.thinking_mask.tolist(), rollout.closed.tolist(), rollout.forced_mask
            ):
                slots = [set(position) for position, t in zip(ids, think) if t]
                counts["think"] += len(slots)
                counts["distinct"] += sum(len(s) for s in slots)
                counts["branched"] += sum(len(s) > 1 for s in slots)
                counts["closed"] += closed and not bool(forced.any())
            _ROLLOUTS.append(counts)
        return rollout

    MultiplexGRPOTrainer._multiplex_generate = recorded


def _main(argv: list[str]) -> int:
    from multiplex_trl import grpo, hub

    register_test_reward()
    record_rollouts()
    finish_training = hub.finish_training

    def finish_with_digest(trainer, **kwargs):
        weights = trained_weights_digest(trainer)
        out = os.environ["GRPO_RUN_DIGESTS"]
        os.makedirs(out, exist_ok=True)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        record = {
            "world_size": trainer.accelerator.num_processes,
            "losses": losses,
            "weights": weights,
            "rollouts": list(_ROLLOUTS),
            "metrics": [
                {k: v for k, v in e.items() if k.startswith("multiplex/")}
                for e in trainer.state.log_history
                if "loss" in e
            ],
            "rollout_gap": rollout_gap(trainer),
        }
        with open(os.path.join(out, f"rank{trainer.accelerator.process_index}.json"), "w") as f:
            json.dump(record, f)
        return finish_training(trainer, **kwargs)

    hub.finish_training = finish_with_digest  # grpo calls hub.finish_training through the module
    return grpo.cli(argv)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
