"""Rollout throughput: multiplex_generate at K=3 and K=1 vs `model.generate(do_sample=True)` (TRL's non-vLLM path).

Same model, batch, prompt and completion length for all three. No row ever stops early: the EOS id (and the
end-of-thinking marker) given to both engines is `vocab_size`, an id no sampler can draw, so every row decodes exactly
`--new-tokens` tokens while each engine still runs its per-step EOS check. The multiplex rollout therefore stays in
its thinking phase (K merged draws) at every position, its most expensive case.

    OMP_NUM_THREADS=1 .venv/bin/python bench/rollout.py                     # CPU defaults, < 3 min
    .venv/bin/python bench/rollout.py --device cuda --batch-sizes 8,32,128 --new-tokens 512

With --fast it instead compares the decode loops of the multiplex rollout at K=--width: the eager loop (DynamicCache,
finished rows leave the batch; the reference), the static KV cache, and the static cache with a compiled decode step
(torch.compile; CUDA graphs on a GPU). The first (untimed) call of each, which includes compilation, is reported too.
"""

from __future__ import annotations

import time

import common
import torch
from transformers import GenerationConfig

from multiplex_trl import multiplex_generate
from multiplex_trl.testing import LoopOps


# Default (prompt length, new tokens) per device and model. On a 2-core CPU, SmolLM2 at batch 32 decodes only a few
# dozen tokens/s, so its CPU default is short enough that the whole script stays under ~3 minutes.
SIZES = {
    "cpu": {"tiny": (32, 64), "smollm2": (16, 8)},
    "cuda": {"tiny": (128, 128), "smollm2": (128, 128)},
}
# --fast: prompt + new tokens fill the static cache's 256-position buckets, so the static loop attends over no more
# padding than it must (it always attends over the whole cache; the eager loop over what has been decoded so far).
FAST_SIZES = {
    "cpu": {"tiny": (32, 224), "smollm2": (16, 48)},
    "cuda": {"tiny": (128, 384), "smollm2": (128, 384)},
}


def engines(model, prompts, mask, *, width: int, new_tokens: int, seed: int, fast: bool = False):
    """The three compared callables (with `fast`: the three decode loops); each returns the completion length."""
    unreachable = model.config.vocab_size  # no sampler draws an id >= vocab_size
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    # TRL's GRPOTrainer generation config (grpo_trainer.py) at its defaults, with the unreachable EOS.
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=True,
        pad_token_id=pad,
        eos_token_id=[unreachable],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        cache_implementation=None,
        disable_compile=True,
    )

    def generate():
        torch.manual_seed(seed)
        out = model.generate(input_ids=prompts, attention_mask=mask, generation_config=config)
        return out.size(1) - prompts.size(1)

    def multiplex(k, **loop):
        def run():
            g = torch.Generator(prompts.device).manual_seed(seed)
            r = multiplex_generate(
                model,
                prompts,
                mask,
                width=k,
                temperature=1.0,
                max_new_tokens=new_tokens,
                thinking_end_ids=[unreachable],
                eos_token_ids=[unreachable],
                pad_token_id=pad,
                generator=g,
                **loop,
            )
            return r.ids.size(1)

        return run

    if fast:
        return {
            "eager": multiplex(width),
            "static": multiplex(width, cache_implementation="static"),
            "compiled": multiplex(width, cache_implementation="static", compile=True),
        }
    return {f"multiplex K={width}": multiplex(width), "multiplex K=1": multiplex(1), "generate": generate}


# LoopOps' host-sync ops as the profiler names them; is_nonzero is left out because the profiler also sees the
# _local_scalar_dense inside it (a dispatch mode sees only that one).
SYNC_OPS = {f"aten::{op}" for op in LoopOps.SYNC_OPS - {"is_nonzero"}}


def count_syncs(run) -> int:
    """Host-sync ops in one call of `run`, at every level (torch.profiler sees the ops inside other ops too, e.g. the
    two `.item()` checks inside `torch.multinomial(probs, 1)`, which a dispatch mode does not)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return sum(1 for e in prof.events() if e.name in SYNC_OPS)


def profile(model, variants, device, steps: int, reps: int) -> list[dict]:
    """Per engine: seconds in the model's forward vs around it, and aten ops / host syncs per decode step."""
    forwards = {name: [] for name in variants}
    with common.ForwardClock(model, device) as clock:
        timed = {name: clock.timed(run, forwards[name]) for name, run in variants.items()}
        totals = common.time_interleaved(timed, reps=reps, warmup=0, device=device)
    rows = []
    for name, run in variants.items():
        with LoopOps(model) as counter:
            run()
        outside = counter.around()
        inside = counter.counts.total() - outside.total()
        top = outside.most_common(6)
        total, fwd = common.median(totals[name]), common.median(forwards[name])
        rows.append(
            {
                "engine": name,
                "total ms/step": 1e3 * total / steps,
                "forward ms/step": 1e3 * fwd / steps,
                "around ms/step": 1e3 * (total - fwd) / steps,
                "ops/step in forward": inside / steps,
                "ops/step around": outside.total() / steps,
                "syncs/step": count_syncs(run) / steps,
                "most frequent ops around": ", ".join(f"{op} {n / steps:.1f}" for op, n in top),
            }
        )
    return rows


def cases(args, device, dtype, sizes, skipped, fast=False):
    """Per model and batch size: (model, the table row's first cells, the compared callables, seconds of each one's
    first call). The first call is the warmup (and compilation for --fast) and checks that it decodes every token."""
    for model_name, model, _, label in common.available_models(args, device, dtype, skipped):
        prompt_len = args.prompt_len or sizes[device.type][model_name][0]
        new_tokens = args.new_tokens or sizes[device.type][model_name][1]
        for batch in args.batch_sizes:
            prompts, mask = common.random_prompts(model.config.vocab_size, batch, prompt_len, device, args.seed)
            variants = engines(
                model, prompts, mask, width=args.width, new_tokens=new_tokens, seed=args.seed, fast=fast
            )
            first_call = {}
            for name, run in variants.items():
                common.sync(device)
                start = time.perf_counter()
                assert run() == new_tokens, f"{name} did not decode exactly {new_tokens} tokens"
                common.sync(device)
                first_call[name] = time.perf_counter() - start
            row = {"model": label, "batch": batch, "prompt": prompt_len, "new tokens": new_tokens}
            yield model, row, variants, first_call
        del model


def main():
    p = common.base_parser(__doc__)
    p.add_argument("--batch-sizes", type=common.int_list, default=[8, 32])
    p.add_argument(
        "--prompt-len",
        type=int,
        default=None,
        help="default: per device and model, see SIZES (FAST_SIZES with --fast) in this file",
    )
    p.add_argument(
        "--new-tokens",
        type=int,
        default=None,
        help="default: per device and model, see SIZES (FAST_SIZES with --fast) in this file",
    )
    p.add_argument("--width", type=int, default=3, help="the multiplex K compared with K=1")
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing: split each engine's time into the model forward and the loop around it, and count "
        "aten ops and host syncs per step (written as <name>-profile)",
    )
    p.add_argument(
        "--fast",
        action="store_true",
        help="compare the decode loops instead: eager vs static KV cache vs static + compiled step (written as "
        "<name>-fast)",
    )
    args = p.parse_args()
    device, dtype = common.setup(args, "rollout")
    if args.fast:
        return fast_loops(args, device, dtype)
    k_name = f"multiplex K={args.width}"

    rows, skipped = [], []
    for model, row, variants, _ in cases(args, device, dtype, SIZES, skipped):
        batch, new_tokens = row["batch"], row["new tokens"]
        if args.profile:
            for profiled in profile(model, variants, device, new_tokens, args.reps):
                rows.append({"model": row["model"], "batch": batch, **profiled})
                print({k: common._cell(v) for k, v in rows[-1].items()}, flush=True)
            continue
        times = common.time_interleaved(variants, reps=args.reps, warmup=args.warmup - 1, device=device)
        tokens = batch * new_tokens
        for name, ts in times.items():
            row[f"{name} tok/s"] = tokens / common.median(ts)
        for ratio, num, den in (
            (f"K{args.width}/K1", k_name, "multiplex K=1"),
            ("K1/generate", "multiplex K=1", "generate"),
            (f"K{args.width}/generate", k_name, "generate"),
        ):
            row[ratio] = common.paired_ratio(times[num], times[den])
            row[f"{ratio} ±"] = common.ratio_spread(times[num], times[den])
        row["targets"] = (
            f"{common.verdict(row[f'K{args.width}/K1'], 1.05)} / {common.verdict(row['K1/generate'], 1.0)}"
        )
        print({k: common._cell(v) for k, v in row.items()}, flush=True)
        rows.append(row)

    if args.profile:
        columns = ["model", "batch", "engine", "total ms/step", "forward ms/step", "around ms/step"]
        columns += ["ops/step in forward", "ops/step around", "syncs/step", "most frequent ops around"]
        notes = [
            f"Medians of {args.reps} interleaved calls per engine after a warmup; 'forward' is the time inside the model's forward (hooks, device "
            "synchronised), 'around' the rest of the loop (sampling, bookkeeping, cache and mask updates). Ops are "
            "top-level aten ops counted in a second call (a dispatch mode: ops inside an op's kernel are not "
            "counted); syncs are ops that wait for the device on CUDA, at every level, counted with torch.profiler in "
            f"a third call ({', '.join(sorted(SYNC_OPS))}). The prefill forward counts in the per-step figures."
        ]
        common.write_results(
            args,
            args.name + "-profile",
            "Rollout profile",
            [("where the time goes", rows, columns)],
            common.environment(device, dtype),
            notes,
            skipped,
        )
        return
    columns = ["model", "batch", "prompt", "new tokens", f"{k_name} tok/s", "multiplex K=1 tok/s", "generate tok/s"]
    for ratio in (f"K{args.width}/K1", "K1/generate", f"K{args.width}/generate"):
        columns += [ratio, f"{ratio} ±"]
    columns += ["targets"]
    notes = [
        f"tok/s = batch * new tokens / median seconds over {args.reps} interleaved rounds; ratios are medians of "
        "per-round time ratios (lower is better for the multiplex engine); ± is half the range of the per-round "
        "ratios (round-to-round noise).",
        f"targets: K{args.width}/K1 <= 1.05 and K1/generate <= 1.0 (issue 7).",
        "EOS and end-of-thinking are set to vocab_size (unreachable): every row decodes all tokens, the multiplex "
        "rows are in the thinking phase throughout; generate uses TRL's GRPOTrainer GenerationConfig "
        "(do_sample, temperature 1, top_p 1, top_k 0, DynamicCache, no compile).",
    ]
    common.write_results(
        args,
        args.name,
        "Rollout throughput",
        [("tokens/s and time ratios", rows, columns)],
        common.environment(device, dtype),
        notes,
        skipped,
    )


def fast_loops(args, device, dtype):
    """--fast: the static-cache and compiled decode loops against the eager loop (same engine, same tokens)."""
    rows, skipped = [], []
    for _, row, variants, first_call in cases(args, device, dtype, FAST_SIZES, skipped, fast=True):
        batch, new_tokens = row["batch"], row["new tokens"]
        row.update({f"{name} first call s": seconds for name, seconds in first_call.items()})
        times = common.time_interleaved(variants, reps=args.reps, warmup=args.warmup - 1, device=device)
        for name, ts in times.items():
            row[f"{name} tok/s"] = batch * new_tokens / common.median(ts)
        for name in ("static", "compiled"):
            row[f"{name}/eager"] = common.paired_ratio(times[name], times["eager"])
            row[f"{name}/eager ±"] = common.ratio_spread(times[name], times["eager"])
        print({k: common._cell(v) for k, v in row.items()}, flush=True)
        rows.append(row)
    columns = ["model", "batch", "prompt", "new tokens", "eager tok/s", "static tok/s", "compiled tok/s"]
    columns += ["static/eager", "static/eager ±", "compiled/eager", "compiled/eager ±", "compiled first call s"]
    notes = [
        f"Multiplex K={args.width}, every position a thinking position (EOS and marker unreachable). tok/s = batch * "
        f"new tokens / median seconds over {args.reps} interleaved rounds; ratios are medians of per-round time "
        "ratios (below 1: faster than the eager loop); ± is half their range.",
        "eager: DynamicCache, finished rows leave the batch (the default, the reference). static: StaticCache sized "
        "to a multiple of 256 positions, fixed shapes. compiled: static + torch.compile of the decode step (slot "
        "merge, forward, temperature and filters of the next logits; mode reduce-overhead = CUDA graphs on cuda; "
        "inductor's C++ backend on cpu). 'first call s' includes compilation (paid again in a training run only for "
        "another batch size, a longer cache or other sampling options).",
    ]
    common.write_results(
        args,
        args.name + "-fast",
        "Rollout decode loops: eager vs static cache vs compiled step",
        [("tokens/s and time ratios against the eager loop", rows, columns)],
        common.environment(device, dtype),
        notes,
        skipped,
    )


if __name__ == "__main__":
    main()
