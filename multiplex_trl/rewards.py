"""Reward functions with TRL's signature `fn(completions, **kwargs) -> list[float | None]`, and their registry.

Rewards grade the answer phase: the text after the end-of-thinking marker; a completion that never closed thinking
scores 0.
Dataset columns arrive as keyword lists: `answer` for every dataset, `task` and `rg_entry` for reasoning_gym ones.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from math_verify import parse, verify


# math-verify's own limits (seconds) on parsing and comparing one answer. Its timeouts use signal.alarm, which only the
# main thread may set: elsewhere (TRL runs async rewards in a thread) they are off, and nothing stops a runaway sympy.
PARSE_TIMEOUT = 5
VERIFY_TIMEOUT = 5

THINKING_END = "</think>"  # the marker that closes the thinking phase; change it with set_thinking_end()


def set_thinking_end(marker: str) -> None:
    """Set the end-of-thinking marker the rewards split on (the trainer calls this with its configured marker)."""
    global THINKING_END
    if not marker:
        raise ValueError("The end-of-thinking marker must be a non-empty string.")
    THINKING_END = marker


def extract_answer(text: str, thinking_end: str | None = None) -> str:
    """The answer phase of a completion: the text after the first end-of-thinking marker, or all of it if absent."""
    marker = thinking_end or THINKING_END
    # Thinking stops at the first marker (the method's stop rule), so everything after it is the answer phase.
    _, found, after = text.partition(marker)
    return after if found else text


def completion_text(completion: str | list[dict[str, str]]) -> str:
    """The text of one completion, plain or conversational ([{"role": "assistant", "content": ...}])."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def accuracy_reward(completions: list, answer: list[str], **kwargs) -> list[float | None]:
    """1.0 if math-verify finds the answer phase equal to the gold `answer`, else 0.0 (also when thinking never
    closed, so there is no answer phase); None if the gold won't parse."""
    # Timeouts rely on signal.alarm, which fails outside the main thread (TRL may call from threads): there they are
    # off. In the main thread (TRL's sync rewards, eval) they stay on: without them one answer such as
    # \boxed{10^{10^{10}}} makes sympy's comparison run forever and the whole run hangs.
    in_main = threading.current_thread() is threading.main_thread()
    parse_timeout, verify_timeout = (PARSE_TIMEOUT, VERIFY_TIMEOUT) if in_main else (None, None)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # silences "Timeout is disabled" on every call
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_parsed = _parse_gold(str(gold))
        if not gold_parsed:
            rewards.append(None)  # TRL treats None as "no reward" for this sample
            continue
        text = completion_text(completion)
        if THINKING_END not in text:  # thinking never closed: no answer phase to grade (as DeepScaleR's reward)
            rewards.append(0.0)
            continue
        predicted = parse(extract_answer(text), parsing_timeout=parse_timeout)
        rewards.append(float(verify(gold_parsed, predicted, timeout_seconds=verify_timeout)))
    return rewards


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    # A bare answer ("18", "\frac{1}{2}") needs math delimiters to be read as LaTeX; an escaped dollar ("\$18.90",
    # MATH's money) is not one, and without them math-verify reads nothing, so every sample would score None.
    text = gold if re.search(r"(?<!\\)\$", gold) or "\\boxed" in gold else f"${gold}$"
    return parse(text, parsing_timeout=None)


def extract_final(text: str) -> str:
    """The final answer in an answer phase: the last \\boxed{...}, else the last <answer>...</answer>, else the last
    non-empty line with any "Answer:" / "The answer is" lead-in (and a closing period) removed."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    tagged = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    if tagged:
        return tagged[-1].strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return LEAD_IN.sub("", lines[-1]).strip().removesuffix(".").strip()


# "Answer: X", "The final answer is: X", "**Answer:** X": the lead-in before a final answer on its line.
LEAD_IN = re.compile(r"^[*_\s]*(?:the\s+)?(?:final\s+)?answer(?![a-z])[*_\s]*(?:is\b)?[*_\s]*:?[*_\s]*", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in `text` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


@functools.lru_cache(maxsize=None)
def _score_fn(task: str) -> Callable[[str | None, dict[str, Any]], float]:
    from reasoning_gym import get_score_answer_fn

    return get_score_answer_fn(task)  # builds the task's dataset once; cached per task


def reasoning_gym_reward(
    completions: list, rg_entry: list[str], task: list[str] | None = None, **kwargs
) -> list[float | None]:
    """reasoning_gym's own score (0..1, some tasks give partial credit) of the final answer in the answer phase; 0.0
    when thinking never closed (no answer phase), as `accuracy_reward`."""
    rewards = []
    for i, completion in enumerate(completions):
        entry = load_entry(rg_entry[i])
        name = task[i] if task is not None else entry["metadata"]["source_dataset"]
        text = completion_text(completion)
        if THINKING_END not in text:
            rewards.append(0.0)
            continue
        predicted = extract_final(extract_answer(text))
        rewards.append(float(_score_fn(name)(predicted, entry)))
    return rewards


# JSON has no tuples, and some reasoning_gym scorers compare with the metadata's tuples (arc_agi and rearc: the parsed
# board against metadata["output"], so a list there never equals it): the `rg_entry` column tags them.
_TUPLE = "__tuple__"


def dump_entry(entry: dict[str, Any]) -> str:
    """A reasoning_gym entry as the JSON of the `rg_entry` column, its tuples tagged so `load_entry` restores them."""

    def tag(value):
        if isinstance(value, tuple):
            return {_TUPLE: [tag(v) for v in value]}
        if isinstance(value, list):
            return [tag(v) for v in value]
        if isinstance(value, dict):
            return {k: tag(v) for k, v in value.items()}
        return value

    return json.dumps(tag(entry), default=str)


def load_entry(text: str) -> dict[str, Any]:
    """The entry `dump_entry` wrote (tuples restored); plain JSON reads as before."""
    return json.loads(text, object_hook=lambda d: tuple(d[_TUPLE]) if d.keys() == {_TUPLE} else d)


def format_reward(completions: list, **kwargs) -> list[float | None]:
    """1.0 if the completion closes thinking with the marker and writes a non-empty answer after it, else 0.0."""
    rewards = []
    for completion in completions:
        _, found, after = completion_text(completion).partition(THINKING_END)
        rewards.append(1.0 if found and after.strip() else 0.0)
    return rewards


REWARD_FUNCS: dict[str, Callable[..., list[float | None]]] = {
    "accuracy": accuracy_reward,
    "reasoning_gym": reasoning_gym_reward,
    "format": format_reward,
}


def get_reward_funcs(names: list[str]) -> list[Callable[..., list[float | None]]]:
    """Look each name up in REWARD_FUNCS, else import it as a dotted path `package.module.function`."""
    return [_get_reward_func(name) for name in names]


# Keyword arguments TRL passes to every reward function besides the dataset's columns.
TRL_REWARD_KWARGS = {
    "prompts",
    "completions",
    "completion_ids",
    "trainer_state",
    "log_extra",
    "log_metric",
    "environments",
}


def check_reward_columns(funcs: list[Callable], names: list[str], columns: list[str], dataset_name: str) -> None:
    """Refuse a reward whose required arguments are not dataset columns: TRL would call it with the columns only, and
    it would fail at the first step, after the model is loaded and a rollout is drawn."""
    for func, name in zip(funcs, names):
        try:
            params = inspect.signature(func).parameters.values()
        except (TypeError, ValueError):  # a builtin or C function: nothing to check
            continue
        for param in params:
            required = param.default is param.empty and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
            if required and param.name not in TRL_REWARD_KWARGS and param.name not in columns:
                raise ValueError(
                    f"reward {name!r} needs the dataset column {param.name!r}, which dataset {dataset_name!r} lacks "
                    f"(columns: {sorted(columns)}): choose a reward that fits this dataset, or another dataset."
                )


def _get_reward_func(name: str) -> Callable[..., list[float | None]]:
    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    module_name, _, attr = name.rpartition(".")
    if not module_name:
        raise ValueError(f"Unknown reward function {name!r}: use one of {sorted(REWARD_FUNCS)} or a dotted path.")
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"Cannot import reward function {name!r} ({error}); use one of {sorted(REWARD_FUNCS)} or a dotted path."
        ) from error
    if not callable(func):
        raise ValueError(f"Reward function {name!r} is not callable.")
    return func
