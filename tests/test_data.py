import json

import datasets
import pytest

from multiplex_trl.data import PROMPT_TEMPLATE, clean_answer, load_prompts


SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."


def test_math500_first_row_uses_the_papers_prompt():
    ds = load_prompts("math500")
    assert len(ds) == 500
    assert {"prompt", "answer"} <= set(ds.column_names)
    row = ds[0]
    assert row["prompt"] == [{"role": "user", "content": row["problem"] + SUFFIX}]
    assert row["prompt"][0]["content"].startswith("Convert the point $(0,3)$ in rectangular coordinates")
    assert row["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_gsm8k_answer_is_the_number_after_hashes():
    train = load_prompts("gsm8k", max_samples=3)
    assert len(train) == 3
    assert train[0]["answer"] == "72"
    assert train[0]["prompt"][0]["content"].startswith("Natalia sold clips to 48 of her friends")
    test = load_prompts("gsm8k", split="test", max_samples=1)
    assert test[0]["answer"] == "18"


def test_template_and_system_prompt():
    ds = load_prompts(
        "gsm8k", split="test", max_samples=1, prompt_template="Q: {problem}\nA:", system_prompt="Be brief."
    )
    system, user = ds[0]["prompt"]
    assert system == {"role": "system", "content": "Be brief."}
    assert user["content"].startswith("Q: Janet’s ducks lay 16 eggs") and user["content"].endswith("\nA:")
    with pytest.raises(ValueError, match=r"\{problem\}"):
        load_prompts("gsm8k", prompt_template="no placeholder")


def test_reasoning_gym_rows_carry_the_entry_to_score():
    config = {"min_terms": 2, "max_terms": 2, "max_digits": 1, "operators": ["+", "+"], "allow_parentheses": False}
    ds = load_prompts("reasoning_gym:basic_arithmetic", dataset_config=config, max_samples=5, seed=3)
    assert len(ds) == 5
    assert set(ds["task"]) == {"basic_arithmetic"}
    entry = json.loads(ds[0]["rg_entry"])
    assert entry["answer"] == ds[0]["answer"]
    a, b = entry["metadata"]["expression"].split(" + ")
    assert int(a) + int(b) == int(ds[0]["answer"])
    assert ds[0]["prompt"][0]["content"] == entry["question"] + SUFFIX
    # Same seed, same data; the test split comes from another seed. A config string works like the dict.
    again = load_prompts(
        "reasoning_gym:basic_arithmetic",
        dataset_config='min_terms=2,max_terms=2,max_digits=1,operators=["+", "+"], allow_parentheses=false',
        max_samples=5,
        seed=3,
    )
    assert again["rg_entry"] == ds["rg_entry"]
    test = load_prompts("reasoning_gym:basic_arithmetic", dataset_config=config, split="test", max_samples=5, seed=3)
    assert test["rg_entry"] != ds["rg_entry"]
    with pytest.raises(ValueError, match="known tasks"):
        load_prompts("reasoning_gym:no_such_task")


def test_local_jsonl_with_question_and_solution(tmp_path):
    path = tmp_path / "toy.jsonl"
    rows = [{"question": "1+1?", "solution": "So it is $\\boxed{2}$."}, {"question": "2+2?", "solution": "4"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_prompts(str(path))
    assert ds["answer"] == ["2", "4"]
    assert ds[0]["prompt"][0]["content"] == "1+1?" + SUFFIX


def test_local_parquet_disk_and_folder(tmp_path):
    data = datasets.Dataset.from_list([{"problem": "p0", "answer": "a0"}, {"problem": "p1", "answer": "a1"}])
    data.to_parquet(str(tmp_path / "toy.parquet"))
    assert load_prompts(str(tmp_path / "toy.parquet"))["answer"] == ["a0", "a1"]
    datasets.DatasetDict({"train": data, "test": data.select([1])}).save_to_disk(str(tmp_path / "saved"))
    assert load_prompts(str(tmp_path / "saved"), split="test")["answer"] == ["a1"]
    (tmp_path / "folder").mkdir()
    data.to_json(str(tmp_path / "folder" / "train.jsonl"))
    data.select([0]).to_json(str(tmp_path / "folder" / "test.jsonl"))
    assert load_prompts(str(tmp_path / "folder"))["answer"] == ["a0", "a1"]
    assert load_prompts(str(tmp_path / "folder"), split="test")["answer"] == ["a0"]


def test_conversational_prompt_column_is_kept(tmp_path):
    messages = [{"role": "user", "content": "hi"}]
    datasets.Dataset.from_list([{"prompt": messages, "answer": "1"}]).to_json(str(tmp_path / "chat.jsonl"))
    assert load_prompts(str(tmp_path / "chat.jsonl"))[0]["prompt"] == messages


def test_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="math500"):
        load_prompts("no_such_dataset")
    with pytest.raises(ValueError, match="does not exist.*gsm8k"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="splits"):
        load_prompts("math500", split="train")
    datasets.Dataset.from_list([{"problem": "p", "label": "x"}]).to_json(str(tmp_path / "noanswer.jsonl"))
    with pytest.raises(ValueError, match="'answer'"):
        load_prompts(str(tmp_path / "noanswer.jsonl"))
    datasets.Dataset.from_list([{"text": "p", "answer": "x"}]).to_json(str(tmp_path / "noproblem.jsonl"))
    with pytest.raises(ValueError, match="'problem'"):
        load_prompts(str(tmp_path / "noproblem.jsonl"))
    with pytest.raises(ValueError, match="empty"):
        load_prompts("math500", max_samples=0)


def test_uncached_hub_dataset_offline_is_one_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/something' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="not cached and HF_HUB_OFFLINE"):
        load_prompts("someone/something")


def test_clean_answer():
    assert clean_answer("step\n#### 1,234") == "1234"
    assert clean_answer("so $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert clean_answer(" 7 ") == "7"
    assert "{problem}" in PROMPT_TEMPLATE


@pytest.mark.parametrize(
    "config, message",
    [
        ("bogus_key=3", r"dataset_config keys \['bogus_key'\] are not options of .*'basic_arithmetic'.*'max_digits'"),
        ("size=3", r"keys \['size'\] are not options"),  # size and seed come from max_samples and seed
        ("max_digits=abc", r"dataset_config \{'max_digits': 'abc'\} does not suit .*: '>=' not supported"),
        ("min_terms=5,max_terms=2", "does not suit reasoning_gym task 'basic_arithmetic': max_terms must be >= min"),
    ],
    ids=["unknown key", "size", "string for a number", "min above max"],
)
def test_bad_reasoning_gym_config_is_one_line_value_error(config, message):
    with pytest.raises(ValueError, match=message) as error:
        load_prompts("reasoning_gym:basic_arithmetic", dataset_config=config, max_samples=2)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda path: path.write_text('{"problem": "p", "answer": "1"}\n{not json\n'), "JSON parse error"),
        (lambda path: path.mkdir(), "doesn't contain any data files"),
    ],
    ids=["corrupt jsonl", "empty folder"],
)
def test_unreadable_local_dataset_is_one_line_value_error(tmp_path, write, message):
    path = tmp_path / "data.jsonl"
    write(path)
    with pytest.raises(ValueError, match=rf"dataset_name '{path}' could not be read \(.*{message}") as error:
        load_prompts(str(path))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["math500", "gsm8k", "math", "local"])
def test_dataset_config_for_a_source_without_configs_is_refused(tmp_path, name):
    if name == "local":
        name = str(tmp_path / "toy.jsonl")
        datasets.Dataset.from_list([{"problem": "p", "answer": "1"}]).to_json(name)
    with pytest.raises(ValueError, match=r"dataset_config='max_terms=2' is not used by dataset .*: remove it"):
        load_prompts(name, dataset_config="max_terms=2", max_samples=1)


def test_reasoning_gym_seed_picks_the_problems():
    """`seed` (the training seed) draws another set of procedural problems; the same seed the same set."""
    rows = {
        seed: load_prompts("reasoning_gym:basic_arithmetic", max_samples=5, seed=seed)["rg_entry"] for seed in (3, 4)
    }
    assert rows[3] != rows[4]
    assert load_prompts("reasoning_gym:basic_arithmetic", max_samples=5, seed=3)["rg_entry"] == rows[3]
    with pytest.raises(ValueError, match="splits 'train' and 'test', got split='validation'"):
        load_prompts("reasoning_gym:basic_arithmetic", split="validation", max_samples=1)


def test_answer_column_wins_over_the_solution(tmp_path):
    """MATH-500 and DeepScaleR carry both: the gold is `answer`, not the last \\boxed{} of the worked solution."""
    path = tmp_path / "both.jsonl"
    path.write_text(
        json.dumps({"problem": "p", "solution": "so \\boxed{3} and more", "answer": "\\frac{6}{2}"}) + "\n"
    )
    assert load_prompts(str(path))["answer"] == ["\\frac{6}{2}"]


def test_float_answers_are_written_out_for_the_grader(tmp_path):
    """A numeric answer column read str(x): 1e-05 and 2e+16, which math-verify reads as 1*e - 5 and 2*e + 16 (Euler's
    number), so every right answer to such a problem scored 0."""
    from multiplex_trl.rewards import accuracy_reward

    rows = [{"problem": "p", "answer": 1e-05}, {"problem": "q", "answer": 2e16}, {"problem": "r", "answer": 2.5}]
    (tmp_path / "floats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    golds = load_prompts(str(tmp_path / "floats.jsonl"))["answer"]
    assert list(golds) == ["0.00001", "20000000000000000", "2.5"]
    completions = [f"t</think>\\boxed{{{x}}}" for x in ("0.00001", "2 \\times 10^{16}", "2.5")]
    assert accuracy_reward(completions, answer=list(golds)) == [1.0, 1.0, 1.0]
