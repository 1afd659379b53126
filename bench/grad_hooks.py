"""What the input-grad hooks that pile up in a long run cost the rollout (and what the trainer's clean-up saves).

transformers registers a hook on the input embeddings each time gradient checkpointing is turned on, and TRL turns it
off and on around every generation and scoring pass, so a GRPO run with gradient checkpointing (TRL's default) gains
two hooks a step: 2N+1 after N steps. Every hook runs at every decode step of every rollout.
MultiplexGRPOTrainer keeps one (`drop_repeated_input_grad_hooks`). This times the multiplex rollout (K=--width)
with the one hook against the 2N+1 hooks that N steps would leave without the clean-up, interleaved, same process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/grad_hooks.py            # CPU, tiny and SmolLM2, < 1 min
    .venv/bin/python bench/grad_hooks.py --device cuda --models tiny,smollm2
"""

from __future__ import annotations

import common
from rollout import SIZES, engines


def hook_sets(model, counts: list[int]) -> dict[int, dict]:
    """For each count, the embeddings' forward hooks with exactly that many of transformers' input-grad hooks,
    registered the way training does (`enable_input_require_grads`, what gradient_checkpointing_enable() calls)."""
    embeddings = model.get_input_embeddings()
    original = embeddings._forward_hooks
    sets = {}
    for count in counts:
        embeddings._forward_hooks = type(original)(original)
        for _ in range(count):
            model.enable_input_require_grads()
        sets[count] = embeddings._forward_hooks
    embeddings._forward_hooks = original
    return sets


def main():
    p = common.base_parser(__doc__)
    p.add_argument("--batch-sizes", type=common.int_list, default=[8])
    p.add_argument("--steps", type=common.int_list, default=[100, 1000, 10000], help="training steps without clean-up")
    p.add_argument("--width", type=int, default=3)
    args = p.parse_args()
    device, dtype = common.setup(args, "grad_hooks")
    rows, skipped = [], []
    for model_name, model, _, label in common.available_models(args, device, dtype, skipped):
        prompt_len, new_tokens = SIZES[device.type][model_name]
        for batch in args.batch_sizes:
            prompts, mask = common.random_prompts(model.config.vocab_size, batch, prompt_len, device, args.seed)
            run = engines(model, prompts, mask, width=args.width, new_tokens=new_tokens, seed=args.seed)[
                f"multiplex K={args.width}"
            ]

            counts = {"1 hook": 1} | {f"{n} steps": 2 * n + 1 for n in args.steps}
            sets = hook_sets(model, list(counts.values()))
            embeddings = model.get_input_embeddings()
            original = embeddings._forward_hooks

            def with_hooks(count):
                def timed():
                    embeddings._forward_hooks = sets[count]  # swaps one dict: nothing timed grows with the count
                    return run()

                return timed

            variants = {name: with_hooks(count) for name, count in counts.items()}
            times = common.time_interleaved(variants, reps=args.reps, warmup=args.warmup, device=device)
            row = {"model": label, "batch": batch, "prompt": prompt_len, "new tokens": new_tokens}
            row["1 hook s"] = common.median(times["1 hook"])
            for n in args.steps:
                row[f"after {n} steps / 1 hook"] = common.paired_ratio(times[f"{n} steps"], times["1 hook"])
                row[f"after {n} steps ±"] = common.ratio_spread(times[f"{n} steps"], times["1 hook"])
            print({k: common._cell(v) for k, v in row.items()}, flush=True)
            rows.append(row)
            embeddings._forward_hooks = original
        del model
    columns = ["model", "batch", "prompt", "new tokens", "1 hook s"]
    for n in args.steps:
        columns += [f"after {n} steps / 1 hook", f"after {n} steps ±"]
    notes = [
        f"Multiplex rollout at K={args.width}, every position a thinking position. 'after N steps': the 2N+1 "
        "input-grad hooks a GRPO run with gradient checkpointing leaves on the embeddings after N steps without the "
        "trainer's clean-up (transformers adds one at each gradient_checkpointing_enable; TRL turns it off and on "
        "twice a step); '1 hook': what MultiplexGRPOTrainer keeps. Ratios are medians of per-round time ratios over "
        f"{args.reps} interleaved rounds; ± is half their range. The training forward runs them too (once per call).",
    ]
    common.write_results(
        args,
        args.name,
        "Input-grad hooks piling up: rollout time",
        [("rollout time against one hook", rows, columns)],
        common.environment(device, dtype),
        notes,
        skipped,
    )


if __name__ == "__main__":
    main()
