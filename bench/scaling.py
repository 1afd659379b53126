"""How the multiplex rollout's cost grows with completion length and with the width K.

1. Length sweep: multiplex_generate at K=`--width` and `model.generate` (same settings as bench/rollout.py) at each
   completion length; cost per token should stay flat as the length grows (linear total time), and whatever growth
   there is should be the model's (attention over a longer cache), shared with `generate`. The time outside the
   model's forward (the loop) is reported per token on its own.
2. Width sweep: multiplex_generate at K = 1, 2, 3, 6 at one length; time relative to K=1 should stay near 1.

EOS and end-of-thinking are unreachable ids, so every row decodes every position in the thinking phase.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scaling.py                     # CPU: tiny model, lengths 256..2048
    .venv/bin/python bench/scaling.py --device cuda --lengths 256,512,1024,2048 --models tiny,smollm2
"""

from __future__ import annotations

import common
from rollout import engines


# Defaults per device: completion lengths of the length sweep, and the length of the width sweep.
LENGTHS = {"cpu": [256, 512, 1024, 2048], "cuda": [256, 512, 1024, 2048]}
WIDTH_SWEEP_LENGTH = {"cpu": 256, "cuda": 1024}
# SmolLM2 decodes 256..2048 tokens in minutes per call on a CPU, and in tens of seconds on a GPU whose eager
# decode step is host-bound (~30 ms/step seen on an H100 host): ask for it with --models tiny,smollm2.
DEFAULT_MODELS = {"cpu": ["tiny"], "cuda": ["tiny"]}


def clocked(model, device, run, record: list[float]):
    """`run` with the model's forward timed (common.ForwardClock, hooks only during this call); appends each call's
    forward seconds to `record`."""

    def call():
        with common.ForwardClock(model, device) as clock:
            run()
        record.append(clock.take())

    return call


def sweep_variants(model, runs: dict, forwards: dict, device) -> dict:
    """The length sweep's callables. The forward clock synchronises the device before and after every forward; on a
    GPU that stops the host from queueing ahead and would slow the very rollouts it splits, so there the totals come
    from plain calls and the forward/loop split from separate clocked calls ('NAME (clocked)'), interleaved with
    them. On a CPU a sync does nothing, and one clocked call gives both."""
    variants = {}
    for name, run in runs.items():
        if common.on_cuda(device):
            variants[name] = run
            variants[f"{name} (clocked)"] = clocked(model, device, run, forwards[name])
        else:
            variants[name] = clocked(model, device, run, forwards[name])
    return variants


def main():
    p = common.base_parser(__doc__, reps=5)  # cheap calls: more rounds for steadier per-token figures
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--lengths", type=common.int_list, default=None, help=f"completion lengths; default {LENGTHS}")
    p.add_argument("--widths", type=common.int_list, default=[1, 2, 3, 6])
    p.add_argument("--width", type=int, default=3, help="K of the length sweep")
    p.add_argument("--width-length", type=int, default=None, help=f"length of the K sweep; {WIDTH_SWEEP_LENGTH}")
    args = p.parse_args()
    device, dtype = common.setup(args, "scaling", models=DEFAULT_MODELS)
    lengths = args.lengths or LENGTHS[device.type]
    width_length = args.width_length or WIDTH_SWEEP_LENGTH[device.type]
    k_name = f"multiplex K={args.width}"

    length_rows, width_rows, skipped = [], [], []
    for model_name, model, _, label in common.available_models(args, device, dtype, skipped):
        prompts, mask = common.random_prompts(model.config.vocab_size, args.batch, args.prompt_len, device, args.seed)

        base = {}
        for length in lengths:
            runs = engines(model, prompts, mask, width=args.width, new_tokens=length, seed=args.seed)
            forwards = {k_name: [], "generate": []}
            variants = sweep_variants(model, {name: runs[name] for name in forwards}, forwards, device)
            times = common.time_interleaved(variants, reps=args.reps, warmup=args.warmup, device=device)
            row = {"model": label, "batch": args.batch, "length": length}
            tokens = args.batch * length
            for name in forwards:
                ts, clocked = times[name], times.get(f"{name} (clocked)", times[name])
                fwd = forwards[name][args.warmup :]  # the timed rounds' clocked calls, in the same order as `clocked`
                loop = common.median([total - f for total, f in zip(clocked, fwd)]) / tokens
                per_token = common.median(ts) / tokens
                base.setdefault(name, (per_token, loop))
                row[f"{name} s"] = common.median(ts)
                row[f"{name} us/token"] = 1e6 * per_token
                row[f"{name} us/token vs shortest"] = per_token / base[name][0]
                row[f"{name} loop us/token"] = 1e6 * loop
                row[f"{name} loop vs shortest"] = loop / base[name][1]
            row[f"K{args.width}/generate"] = common.paired_ratio(times[k_name], times["generate"])
            print({k: common._cell(v) for k, v in row.items()}, flush=True)
            length_rows.append(row)

        variants = {}
        for k in args.widths:
            variants[f"K={k}"] = engines(model, prompts, mask, width=k, new_tokens=width_length, seed=args.seed)[
                f"multiplex K={k}"
            ]
        times = common.time_interleaved(variants, reps=args.reps, warmup=args.warmup, device=device)
        first = next(iter(times))
        for name, ts in times.items():
            row = {"model": label, "batch": args.batch, "length": width_length, "width": name}
            row["s"] = common.median(ts)
            row["us/token"] = 1e6 * common.median(ts) / (args.batch * width_length)
            row[f"time / {first}"] = common.paired_ratio(ts, times[first])
            print({k: common._cell(v) for k, v in row.items()}, flush=True)
            width_rows.append(row)
        del model

    length_columns = ["model", "batch", "length"]
    for name in (k_name, "generate"):
        length_columns += [f"{name} s", f"{name} us/token", f"{name} us/token vs shortest"]
        length_columns += [f"{name} loop us/token", f"{name} loop vs shortest"]
    length_columns += [f"K{args.width}/generate"]
    first = f"K={args.widths[0]}"
    width_columns = ["model", "batch", "length", "width", "s", "us/token", f"time / {first}"]
    notes = [
        f"Medians of {args.reps} interleaved rounds; ratios are medians of per-round ratios. us/token = seconds / "
        "(batch * completion length); 'vs shortest' divides by the same engine's per-token cost at the shortest "
        "length (1.0 everywhere = time linear in length).",
        "'loop' is the time outside the model's forward (timed with forward hooks; on a GPU in separate calls "
        "interleaved with the timed ones, as the hooks synchronise the device at every forward): sampling, "
        "bookkeeping, cache and mask updates. The loop's work per step does not grow with length: it issues the same "
        "aten ops at every step of every length (tests/test_rollout.py, the loop-cost test). Where its time per token "
        "still rises at long lengths (and `generate`'s loop's with it), that is the host: the forward streams a "
        "growing KV cache through the CPU caches and evicts the loop's data.",
        "Growth in the total per-token cost comes from the forward (attention over a longer KV cache, DynamicCache "
        "growing by concatenation), which `generate` pays too.",
        f"prompt length {args.prompt_len}; EOS and end-of-thinking unreachable (every position is a thinking position).",
    ]
    common.write_results(
        args,
        args.name,
        "Rollout scaling with completion length and width",
        [
            (f"completion length (multiplex K={args.width} vs generate)", length_rows, length_columns),
            (f"width K at length {width_length}", width_rows, width_columns),
        ],
        common.environment(device, dtype),
        notes,
        skipped,
    )


if __name__ == "__main__":
    main()
