import json
import threading

import pytest

from multiplex_trl import rewards
from multiplex_trl.rewards import (
    REWARD_FUNCS,
    accuracy_reward,
    extract_answer,
    extract_final,
    format_reward,
    get_reward_funcs,
    reasoning_gym_reward,
)


def chat(text):
    return [{"role": "assistant", "content": text}]


def test_extract_answer_splits_at_the_first_marker():
    assert extract_answer("think</think>answer") == "answer"
    assert extract_answer("a</think>b</think>c") == "b</think>c"
    assert extract_answer("no marker") == "no marker"
    assert extract_answer("x\n</reasoning>\ny", thinking_end="</reasoning>") == "\ny"


def test_accuracy_on_known_pairs():
    completions = [
        chat("so 2+2</think>The answer is \\boxed{4}."),  # right, boxed
        chat("</think>\\boxed{5}"),  # wrong
        chat("</think>It is 0.5"),  # \frac{1}{2} == 0.5
        chat("</think>\\boxed{\\frac{1}{2}}"),  # 0.5 == \frac{1}{2}
        "plain string, no marker: 18",  # thinking never closed: no answer phase, reward 0
        chat("I guess \\boxed{7}</think>\\boxed{8}"),  # only the answer phase counts
    ]
    answers = ["4", "4", "\\frac{1}{2}", "0.5", "18", "7"]
    assert accuracy_reward(completions, answer=answers) == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_accuracy_skips_unparseable_gold():
    assert accuracy_reward([chat("</think>1")], answer=[""]) == [None]


def test_accuracy_runs_outside_the_main_thread():
    out = []
    thread = threading.Thread(target=lambda: out.extend(accuracy_reward([chat("</think>\\boxed{3}")], answer=["3"])))
    thread.start()
    thread.join()
    assert out == [1.0]


def test_marker_is_configurable(monkeypatch):
    monkeypatch.setattr(rewards, "THINKING_END", "</think>")
    rewards.set_thinking_end("Final answer:")
    assert format_reward(["steps... Final answer: 3", "steps... </think> 3"]) == [1.0, 0.0]
    assert accuracy_reward(["2 Final answer: 3"], answer=["3"]) == [1.0]
    with pytest.raises(ValueError, match="non-empty"):
        rewards.set_thinking_end("")


def test_format_needs_marker_and_answer():
    assert format_reward([chat("a</think>b"), chat("a</think>  \n"), chat("no marker")]) == [1.0, 0.0, 0.0]


def test_extract_final():
    assert extract_final("so \\boxed{\\frac{1}{2}} ok") == "\\frac{1}{2}"
    assert extract_final("x <answer> 12 </answer> y") == "12"
    assert extract_final("work\n\nAnswer: 42\n") == "42"
    assert extract_final("work\nThe final answer is 7") == "7"
    assert extract_final("") == ""
    # lead-ins with a colon after "is", markdown, a closing period: all left ': X' or 'X.' behind (partial credit)
    for line in ("The answer is: 5", "The final answer is: 5", "**Answer:** 5", "Answer: 5.", "__Answer__: 5"):
        assert extract_final(f"work\n{line}") == "5", line
    assert extract_final("answered 5") == "answered 5" and extract_final("Answer: -2.5.") == "-2.5"


def test_money_golds_with_an_escaped_dollar_are_graded():
    """MATH writes money as \\$18.90: the gold parsed to nothing, so every sample on it scored None (3 of MATH-500)."""
    golds = ["\\$18.90", "\\$32,\\!348", "\\$36"]
    good = [chat(f"t</think>\\boxed{{{x}}}") for x in ("18.90", "\\$32,348", "36")]
    assert accuracy_reward(good, golds) == [1.0, 1.0, 1.0]
    assert accuracy_reward([chat("t</think>\\boxed{19}")], ["\\$18.90"]) == [0.0]


def test_reasoning_gym_scores_with_the_task():
    import reasoning_gym

    entry = reasoning_gym.create_dataset("chain_sum", size=1, seed=0)[0]
    gold = entry["answer"]
    completions = [chat(f"</think>\\boxed{{{gold}}}"), chat(f"thinking</think>\nAnswer: {gold}"), chat("</think>no")]
    completions.append(chat(f"\\boxed{{{gold}}}"))  # thinking never closed: no answer phase, 0 (it was graded)
    rg_entry = [json.dumps(entry)] * 4
    assert reasoning_gym_reward(completions, rg_entry=rg_entry, task=["chain_sum"] * 4) == [1.0, 1.0, 0.0, 0.0]
    # Without a task column the entry's own metadata names the task.
    assert reasoning_gym_reward(completions[:1], rg_entry=rg_entry[:1]) == [1.0]


def test_registry_and_dotted_paths():
    assert get_reward_funcs(["accuracy", "format", "reasoning_gym"]) == [
        accuracy_reward,
        format_reward,
        reasoning_gym_reward,
    ]
    assert [f.__name__ for f in REWARD_FUNCS.values()] == ["accuracy_reward", "reasoning_gym_reward", "format_reward"]
    assert get_reward_funcs(["multiplex_trl.rewards.format_reward"]) == [format_reward]
    with pytest.raises(ValueError, match=r"Unknown reward function 'nope'.*\['accuracy', 'format', 'reasoning_gym'\]"):
        get_reward_funcs(["nope"])
    with pytest.raises(ValueError, match="Cannot import reward function 'no_such_pkg.fn'.*accuracy"):
        get_reward_funcs(["no_such_pkg.fn"])
    with pytest.raises(ValueError, match="Cannot import"):
        get_reward_funcs(["multiplex_trl.rewards.no_such_fn"])


def test_the_trainer_sets_the_bundled_rewards_marker(tok, model):
    """Only the training script set it: a trainer built in Python with another thinking_end scored every completion
    of `accuracy_reward` 0 (the rewards looked for '</think>')."""
    from datasets import Dataset

    from multiplex_trl import MultiplexGRPOConfig, MultiplexGRPOTrainer

    args = MultiplexGRPOConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none", thinking_end="A:")
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1+1?"}]] * 8, "answer": ["2"] * 8})
    MultiplexGRPOTrainer(
        model=model, reward_funcs=accuracy_reward, args=args, train_dataset=dataset, processing_class=tok
    )
    assert rewards.THINKING_END == "A:"
    assert accuracy_reward([chat("1+1 A: 2")], answer=["2"]) == [1.0]


def test_only_the_answer_phase_is_graded_when_it_has_no_answer():
    """A right \\boxed{} in the thinking does not count when the answer phase gives none (or another one)."""
    import reasoning_gym

    assert accuracy_reward([chat("so \\boxed{7}</think>I am not sure.")], answer=["7"]) == [0.0]
    entry = reasoning_gym.create_dataset("chain_sum", size=1, seed=0)[0]
    text = f"so \\boxed{{{entry['answer']}}}</think>I am not sure."
    assert reasoning_gym_reward([chat(text)], rg_entry=[json.dumps(entry)], task=["chain_sum"]) == [0.0]


def test_last_boxed_answer_is_the_final_one():
    assert extract_final("first \\boxed{1}, then \\boxed{\\frac{2}{3}} and done") == "\\frac{2}{3}"
    assert rewards.last_boxed("\\boxed{4} \\boxed{5") is None  # unbalanced: no answer


def test_reward_columns_check_reads_the_signature():
    """Required arguments (keyword-only ones too) must be dataset columns or what TRL passes every reward."""
    from multiplex_trl.rewards import check_reward_columns

    def needs_level(completions, *, level, **kwargs):
        return [0.0] * len(completions)

    def uses_trl_kwargs(prompts, completions, completion_ids, trainer_state, answer, hint=None, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match="reward 'mine' needs the dataset column 'level', which dataset 'ds' lacks"):
        check_reward_columns([needs_level], ["mine"], ["prompt", "answer"], "ds")
    check_reward_columns([needs_level, uses_trl_kwargs], ["a", "b"], ["prompt", "answer", "level"], "ds")


def test_a_runaway_comparison_is_cut_off_in_the_main_thread():
    """sympy compares 10^{10^{10}} with a gold forever: with math-verify's timeouts off in every thread, one such
    answer hung the training step (TRL calls sync rewards in the main thread) or the eval run. A subprocess, so a
    regression fails here instead of hanging the suite."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "from multiplex_trl.rewards import accuracy_reward\n"
        "print(accuracy_reward(['t</think>\\\\boxed{10^{10^{10}}}', 't</think>\\\\boxed{5}'], answer=['5', '5']))"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("accuracy_reward did not return within 90 s on \\boxed{10^{10^{10}}}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[0.0, 1.0]"


def test_reasoning_gym_entries_keep_their_tuples():
    """rg_entry is stored as JSON, which turned the metadata's tuples into lists: arc_agi and rearc compare the parsed
    board (a tuple of tuples) with metadata['output'], so the exact gold scored 0.05, never 1."""
    from multiplex_trl.data import load_prompts

    for task in ("arc_agi", "rearc"):
        row = load_prompts(f"reasoning_gym:{task}", max_samples=1)[0]
        completions = [chat(f"t</think>\\boxed{{{row['answer']}}}")]
        assert reasoning_gym_reward(completions, rg_entry=[row["rg_entry"]], task=[task]) == [1.0], task
