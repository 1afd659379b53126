import dataclasses
import itertools
import json
from collections import defaultdict

import pytest
import torch

from multiplex_trl import cli, evaluate, inference
from multiplex_trl.evaluate import UsageError, bootstrap_ci, grade, load_problems, parse_ks, pass_at_k


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    assert pass_at_k(1024, 1, 1) == pytest.approx(1 / 1024)
    assert 0.0 < pass_at_k(1024, 3, 1024) <= 1.0 and pass_at_k(1024, 0, 512) == 0.0
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 8)


def test_parse_ks():
    assert parse_ks("1,2,4,...,64", 64) == [1, 2, 4, 8, 16, 32, 64]
    assert parse_ks("1,...,8", 8) == [1, 2, 4, 8]
    assert parse_ks(None, 6) == [1, 2, 4, 6] and parse_ks(None, 64)[-1] == 64
    with pytest.raises(UsageError, match="k=128 > n=64"):
        parse_ks("1,128", 64)
    with pytest.raises(UsageError, match="not an integer"):
        parse_ks("1,two", 4)
    for text in ("0,...,4", "-1,...,4"):  # '...' doubled 0 forever
        with pytest.raises(UsageError, match="--k values must be >= 1"):
            parse_ks(text, 4)
    for text in ("", ","):  # an IndexError
        with pytest.raises(UsageError, match="names no value"):
            parse_ks(text, 4)


def test_bootstrap_ci():
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    lo, hi = bootstrap_ci([0.0] * 50 + [1.0] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.3


@pytest.mark.parametrize(
    ("text", "gold", "score"),
    [
        ("<think>\nhmm</think>The answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
        ("<think>\nhmm</think>So $x = \\boxed{18}$", "18", 1.0),
        ("<think>\nhmm</think>\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
        ("<think>\nhmm</think>\\boxed{3}", "4", 0.0),
        ("<think>\n\\boxed{4}</think>\\boxed{3}", "4", 0.0),  # only the answer phase is graded
    ],
)
def test_grade_math(text, gold, score):
    assert grade(text, {"answer": gold}) == score


def test_grade_reasoning_gym():
    problem = load_problems("reasoning_gym:basic_arithmetic", max_samples=1)[0]
    assert grade(f"<think>ok</think>\\boxed{{{problem['answer']}}}", problem) == 1.0
    assert grade("<think>ok</think>\\boxed{not a number}", problem) == 0.0


@pytest.fixture
def eval_args(tiny_model_dir, tmp_path):
    data = tmp_path / "problems.jsonl"
    rows = [{"problem": "1+1", "answer": "2"}, {"problem": "2+5", "answer": "7"}, {"problem": "3", "answer": "3"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["eval", "--model", tiny_model_dir, "--dataset", str(data), "--n", "4", "--k", "1,2,4"]
    args += ["--width", "1", "--width", "3", "--max-new-tokens", "8", "--max-thinking-tokens", "3"]
    return args + ["--output", str(out), "--device", "cpu"], out


@pytest.fixture
def count_rows(monkeypatch):
    """Counts the completions sampled (rows of every rollout)."""
    rows = []
    rollout = inference.multiplex_generate

    def counting(model, input_ids, *args, **kwargs):
        rows.append(input_ids.size(0))
        return rollout(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(inference, "multiplex_generate", counting)
    return rows


def _records(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_eval_end_to_end_and_resume(eval_args, count_rows, capsys):
    args, out = eval_args
    assert cli.main(args) == 0
    assert sum(count_rows) == 3 * 4 * 2
    table = capsys.readouterr().out
    assert "| dataset | method |" in table and "| discrete |" in table and "| multiplex(K=3) |" in table
    assert (out / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["n"] == 4 and report["settings"]["ks"] == [1, 2, 4]

    # The figures in results.json follow from samples.jsonl.
    records = _records(out)
    keys = [(r["dataset"], r["method"], r["problem"], r["sample"]) for r in records]
    assert len(keys) == len(set(keys)) == 24
    correct = defaultdict(lambda: defaultdict(int))
    for r in records:
        assert r["correct"] == (r["score"] == 1.0)
        correct[(r["dataset"], r["method"])][r["problem"]] += r["correct"]
    for (dataset, method), per_problem in correct.items():
        metrics = report["results"][dataset][method]
        assert metrics["problems"] == 3 and metrics["width"] == (1 if method.startswith("discrete") else 3)
        for k in (1, 2, 4):
            expected = sum(pass_at_k(4, per_problem[p], k) for p in range(3)) / 3
            assert metrics["pass@k"][str(k)] == pytest.approx(expected)
            lo, hi = metrics["ci95"][str(k)]
            assert lo <= expected + 1e-9 and expected - 1e-9 <= hi
        assert f"{100 * metrics['pass@k']['4']:.1f}" in table

    # A rerun finds every sample done; a run cut short redraws only what is missing.
    count_rows.clear()
    assert cli.main(args) == 0 and sum(count_rows) == 0 and _records(out) == records
    lines = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(lines[:-5]) + lines[-5][:10])  # 5 lines lost, one half-written
    assert cli.main(args) == 0 and sum(count_rows) == 5
    keys = [(r["dataset"], r["method"], r["problem"], r["sample"]) for r in _records(out)]
    assert len(keys) == len(set(keys)) == 24
    assert json.loads((out / "results.json").read_text())["results"].keys() == report["results"].keys()

    # Other decoding settings in the same folder are refused, and so is another seed (results.json records one).
    assert cli.main([*args, "--temperature", "0.5"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert cli.main([*args, "--seed", "7"]) == 2
    assert "already holds samples drawn with --seed 0" in capsys.readouterr().err

    # A rerun of one method keeps the other's results (they were dropped from results.json).
    i = args.index("--width")
    one = args[:i] + args[i + 2 :]  # --width 3 only
    before = json.loads((out / "results.json").read_text())["results"]
    assert cli.main(one) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["results"] == before
    assert set(after["settings"]["methods"]) == {"discrete", "multiplex(K=3)"}  # the settings of both stay recorded
    assert "| discrete |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--dataset": "mathh500"}, "known: ['math500'"),
        ({"--k": "1,8"}, "k=8 > n=4"),
        ({"--model": "/no/such/model"}, "does not exist"),
        ({"--dataset": "aime24"}, "not cached"),
        ({"--dataset": "reasoning_gym:no_such_task"}, "Unknown reasoning_gym task"),
        (
            {"--mixer": "coconut"},
            "Unknown mixer 'coconut'; known: ['dirichlet', 'gumbel', 'mot_distinct', 'multiplex'",
        ),
        ({"--gumbel-tau": "0.3"}, "gumbel_tau is a parameter of mixer 'gumbel', not of 'multiplex'"),
        ({"--batch-size": "0"}, "--batch-size must be an integer >= 1, got 0."),
        ({"--dataset-config": "max_terms=2"}, "dataset_config='max_terms=2' is not used by dataset"),
        (
            {"--dataset": "reasoning_gym:basic_arithmetic", "--dataset-config": "bogus_key=3"},
            "dataset_config keys ['bogus_key'] are not options of reasoning_gym task 'basic_arithmetic'",
        ),
        (
            {"--dataset": "reasoning_gym:basic_arithmetic", "--dataset-config": "max_digits=abc"},
            "dataset_config {'max_digits': 'abc'} does not suit reasoning_gym task 'basic_arithmetic'",
        ),
        (
            {"--dataset": "reasoning_gym:basic_arithmetic", "--dataset-config": "min_terms=5,max_terms=2"},
            "max_terms must be >= min_terms",
        ),
    ],
)
def test_eval_bad_input_is_refused_before_loading(eval_args, monkeypatch, capsys, change, message):
    args, out = eval_args
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(evaluate, "load_model", no_load)
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing written that looks like a run


def test_a_marker_the_tokenizer_refuses_leaves_no_run_to_resume(eval_args, count_rows, capsys):
    """Found only once the tokenizer is loaded, but after results.json had recorded the refused settings: the corrected
    rerun into the same --output was then refused as a resume with other settings, though no sample existed."""
    args, out = eval_args
    assert cli.main([*args, "--thinking-end", "§"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("multiplex-trl eval: error: thinking_end='§' cannot be encoded")
    assert sum(count_rows) == 0 and not (out / "results.json").exists() and not (out / "samples.jsonl").exists()
    assert cli.main(args) == 0 and sum(count_rows) == 3 * 4 * 2


@pytest.mark.parametrize("device, message", [("bogus", "is not a torch device"), ("cuda", "CUDA is not available")])
def test_eval_and_generate_refuse_a_bad_device_before_loading(eval_args, monkeypatch, capsys, device, message):
    """A traceback (torch's parse error, or 'Torch not compiled with CUDA enabled' after the model loaded)."""
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(evaluate, "load_model", no_load)
    monkeypatch.setattr(inference, "load_model", no_load)
    args, out = eval_args
    args[args.index("--device") + 1] = device
    assert cli.main(args) == 2
    model = args[args.index("--model") + 1]
    assert cli.main(["generate", "--model", model, "--prompt", "1+1", "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(message in line for line in err) and not out.exists()


@pytest.mark.parametrize("n, batch_size, message", [(4, 0, "batch_size"), (0, 4, "n")], ids=["batch_size", "n"])
def test_evaluate_refuses_counts_below_one_before_writing(tmp_path, n, batch_size, message):
    with pytest.raises(UsageError, match=f"^{message} must be an integer >= 1, got 0"):
        evaluate.evaluate(None, None, {}, {}, n=n, ks=[1], output_dir=tmp_path / "out", batch_size=batch_size)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "engine, message",
    [
        ({"cache_implementation": "offloaded"}, "cache_implementation must be one of"),
        ({"compile": True}, "set cache_implementation='static'"),
    ],
    ids=["cache", "compile"],
)
def test_evaluate_refuses_bad_decode_options_before_writing(tmp_path, engine, message):
    """They were refused only by the first rollout, after the output folder and its results.json were written."""
    with pytest.raises(UsageError, match=message) as error:
        evaluate.evaluate(None, None, {}, {}, n=1, ks=[1], output_dir=tmp_path / "out", **engine)
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_raising_n_draws_fresh_samples(eval_args, tmp_path, monkeypatch):
    """Samples added by a rerun with a larger n are new draws, not replays of the first ones' random stream."""
    args, out = eval_args
    # The dataset's name seeds its batches: a relative name keeps the draws (and the repeats below) the same on every
    # run; the absolute tmp path changed them with every pytest run, and now and then two repeats came by chance.
    monkeypatch.chdir(tmp_path)
    args[args.index("--dataset") + 1] = "problems.jsonl"
    small = list(args)
    small[small.index("--n") + 1], small[small.index("--k") + 1] = "2", "1,2"
    assert cli.main(small) == 0
    assert cli.main(args) == 0
    texts = defaultdict(list)
    for r in _records(out):
        texts[(r["method"], r["problem"])].append(r["text"])
    assert all(len(t) == 4 for t in texts.values())
    repeats = sum(len(t) - len(set(t)) for t in texts.values())
    assert repeats <= 1  # 8-token random texts: a repeat or two by chance at most, never all


def test_eval_compares_mixers_side_by_side(eval_args, count_rows, capsys):
    """--mixer and --width combine into methods, one table row each; results.json holds each method's settings."""
    args, out = eval_args
    for _ in range(2):  # drop the fixture's widths
        i = args.index("--width")
        del args[i : i + 2]
    args += ["--mixer", "multiplex", "--mixer", "soft", "--width", "2"]
    assert cli.main(args) == 0
    table = capsys.readouterr().out
    assert "| multiplex(K=2) |" in table and "| soft(K=2) |" in table
    assert "- soft(K=2): temperature=0.6, top_p=0.95, top_k=30, min_p=0.001" in table  # the paper's, said aloud
    assert sum(count_rows) == 3 * 4 * 2
    report = json.loads((out / "results.json").read_text())
    methods = report["settings"]["methods"]
    assert set(methods) == {"multiplex(K=2)", "soft(K=2)"}
    soft, multiplex = methods["soft(K=2)"], methods["multiplex(K=2)"]
    assert soft["mixer"] == "soft" and soft["width"] == 2 and "cold_stop_steps" in soft["mixer_params"]
    assert (soft["temperature"], soft["top_p"], soft["top_k"], soft["min_p"]) == (0.6, 0.95, 30, 0.001)  # paper's
    assert multiplex["mixer_params"] == {"merge": "weighted"} and multiplex["temperature"] == 1.0
    for name, metrics in report["results"][next(iter(report["results"]))].items():
        assert metrics["mixer"] == methods[name]["mixer"] and metrics["width"] == 2
    # Soft Thinking's thinking is deterministic: all samples of a problem think the same text (the answer after the
    # marker is sampled, as for every mixer).
    thoughts = defaultdict(set)
    for r in _records(out):
        thoughts[(r["method"], r["problem"])].add((r["thinking_length"], r["text"].split("</think>")[0]))
    assert all(len(t) == 1 for (method, _), t in thoughts.items() if method.startswith("soft"))

    # Adding a method to the same folder draws only its samples; the others resume. A mixer parameter applies to
    # its own mixer (and names the method when it is not the default).
    count_rows.clear()
    assert cli.main([*args, "--mixer", "gumbel", "--gumbel-tau", "0.3"]) == 0
    assert sum(count_rows) == 3 * 4 and "| gumbel(K=2, gumbel_tau=0.3) |" in capsys.readouterr().out
    assert {r["method"] for r in _records(out)} == {"multiplex(K=2)", "soft(K=2)", "gumbel(K=2, gumbel_tau=0.3)"}


def test_eval_runs_the_static_cache_loop(eval_args, monkeypatch):
    """--cache-implementation static reaches every rollout of the run and the run completes."""
    args, out = eval_args
    seen = []
    rollout = inference.multiplex_generate

    def recording(*a, **kwargs):
        seen.append(kwargs.get("cache_implementation"))
        return rollout(*a, **kwargs)

    monkeypatch.setattr(inference, "multiplex_generate", recording)
    assert cli.main([*args, "--cache-implementation", "static"]) == 0
    assert seen and set(seen) == {"static"}
    assert len(_records(out)) == 3 * 4 * 2


def test_method_metrics_count_only_full_credit_as_correct():
    """Partial credit (reasoning_gym) and ungradable samples are not correct for pass@k; mean_score averages every
    score with None as 0, and the ungradable ones are counted."""
    m = evaluate.method_metrics({0: [1.0, 0.5, None, 0.0], 1: [0.25, 0.0, 0.0, 1.0]}, n=4, ks=[1, 2])
    assert m["pass@k"]["1"] == pytest.approx((1 / 4 + 1 / 4) / 2)
    assert m["pass@k"]["2"] == pytest.approx(pass_at_k(4, 1, 2))
    assert m["mean_score"] == pytest.approx((1.0 + 0.5 + 0.25 + 1.0) / 8)
    assert m["ungradable"] == 1 and m["problems"] == 2 and m["n"] == 4


def test_bootstrap_ci_is_a_95_percent_interval():
    """Half 0, half 1 over 100 problems: the mean's standard error is 0.05, so the 95% interval is 0.5 +- 0.098."""
    lo, hi = bootstrap_ci([0.0] * 50 + [1.0] * 50)
    assert lo == pytest.approx(0.5 - 1.96 * 0.05, abs=0.01) and hi == pytest.approx(0.5 + 1.96 * 0.05, abs=0.01)


def test_summary_table_puts_the_ci_on_pass_at_1():
    metrics = {"problems": 3, "n": 4, "closed_rate": 0.5, "mean_length": 12.0}
    metrics.update({"pass@k": {"1": 0.25, "4": 0.5}, "ci95": {"1": [0.1, 0.4], "4": [0.3, 0.7]}})
    table = evaluate.summary_table({"toy": {"discrete": metrics}})
    assert table.splitlines()[-1] == "| toy | discrete | 3 x 4 | 25.0 (10.0-40.0) | 50.0 | 50% | 12 |"


def test_parse_ks_drops_repeats():
    assert parse_ks("4,1,1,2,...,4", 4) == [1, 2, 4]


def test_load_problems_defaults_to_the_test_split():
    """Evaluation draws held-out problems: gsm8k's and math's test files, reasoning_gym's test seed (not the training
    data that `load_prompts` gives by default)."""
    from multiplex_trl.data import load_prompts

    assert load_problems("gsm8k", max_samples=1)[0]["answer"] == "18"  # the test split's first problem (train: 72)
    assert load_problems("gsm8k", split="train", max_samples=1)[0]["answer"] == "72"
    assert load_problems("math", max_samples=1)[0]["problem"] == load_prompts("math", split="test")[0]["problem"]
    rg = load_problems("reasoning_gym:basic_arithmetic", max_samples=3)["rg_entry"]
    assert rg == load_prompts("reasoning_gym:basic_arithmetic", split="test", max_samples=3)["rg_entry"]
    assert rg != load_prompts("reasoning_gym:basic_arithmetic", max_samples=3)["rg_entry"]


@pytest.fixture
def scripted(monkeypatch):
    """Replaces the rollout of `evaluate` by scripted completions: `texts(prompt_text, index)` -> (text, closed)
    where index counts the calls for that prompt. Records every batch's (conversations, decoding)."""
    import torch

    from multiplex_trl.inference import Sample

    calls, seen = [], defaultdict(int)

    def install(texts):
        def decode_batch(model, tokenizer, conversations, decoding, generator=None, **kwargs):
            calls.append((conversations, decoding))
            samples = []
            for messages in conversations:
                prompt = messages[-1]["content"]
                text, closed = texts(prompt, seen[prompt])
                seen[prompt] += 1
                length = 10 + seen[prompt]  # a distinct length per sample: the means below are checkable
                samples.append(
                    Sample(
                        text=text,
                        thinking=text,
                        answer="",
                        ids=torch.zeros(length, 1, dtype=torch.long),
                        weights=torch.ones(length, 1),
                        thinking_length=length - 5,
                        closed=closed,
                    )
                )
            return samples

        monkeypatch.setattr(evaluate, "decode_batch", decode_batch)
        return calls

    return install


def test_eval_grades_the_answer_phase_after_the_runs_marker(scripted, tiny_model_dir, tmp_path):
    """Scripted completions on a reasoning_gym task with --thinking-end 'Answer:': what samples.jsonl and results.json
    say about each (score, correct, prediction from the answer phase, closed rate, lengths, pass@k)."""
    problems = load_problems("reasoning_gym:basic_arithmetic", max_samples=2)
    golds = {row["prompt"][-1]["content"]: row["answer"] for row in problems}

    def texts(prompt, i):
        gold = golds[prompt]
        return [
            (f"\\boxed{{123456789}} so Answer: \\boxed{{{gold}}}", True),  # right; the thinking's box is not graded
            (f"hmm Answer: \\boxed{{{gold}0}}", True),  # partial credit from the task's scorer: not correct
            (f"\\boxed{{{gold}}} and I never close", False),  # no answer phase: 0
            (f"\\boxed{{{gold}}} Answer: no idea", True),  # the answer phase has no answer: 0
        ][i]

    calls = scripted(texts)
    out = tmp_path / "out"
    args = ["eval", "--model", tiny_model_dir, "--dataset", "reasoning_gym:basic_arithmetic", "--max-samples", "2"]
    args += ["--n", "4", "--k", "1,4", "--width", "1", "--thinking-end", "Answer:", "--output", str(out)]
    assert cli.main([*args, "--device", "cpu"]) == 0
    assert {d.thinking_end for _, d in calls} == {"Answer:"}

    records = sorted(_records(out), key=lambda r: (r["problem"], r["length"]))
    assert [r["sample"] for r in records] == [0, 1, 2, 3] * 2
    for r in records:
        gold = problems[r["problem"]]["answer"]
        i = r["length"] - 11
        assert r["closed"] == (i != 2) and r["thinking_length"] == r["length"] - 5
        assert r["correct"] == (i == 0) and r["gold"] == gold
        if i == 0:
            assert r["score"] == 1.0 and r["prediction"] == gold
        elif i == 1:
            assert 0.0 < r["score"] < 1.0 and r["prediction"] == gold + "0"
        else:
            assert r["score"] == 0.0 and (i == 2 or r["prediction"] == "no idea")
    metrics = json.loads((out / "results.json").read_text())["results"]["reasoning_gym:basic_arithmetic"]["discrete"]
    assert metrics["pass@k"] == {"1": 0.25, "4": 1.0}
    partial = records[1]["score"] + records[5]["score"]
    assert metrics["mean_score"] == pytest.approx((2 + partial) / 8) and metrics["ungradable"] == 0
    assert metrics["closed_rate"] == 0.75 and metrics["mean_length"] == 12.5 and metrics["mean_thinking_length"] == 7.5


def test_eval_flags_reach_the_prompts_and_the_decoding(scripted, tiny_model_dir, tmp_path, monkeypatch):
    """Every data and decoding flag of `multiplex-trl eval` reaches the prompts, the decode settings, the batches and
    the samplers' seeds; results.json records them."""
    calls = scripted(lambda prompt, i: ("t</think>\\boxed{1}", True))
    seeds = []
    batch_seed = evaluate.batch_seed
    monkeypatch.setattr(evaluate, "batch_seed", lambda seed, *a: seeds.append(seed) or batch_seed(seed, *a))
    out = tmp_path / "out"
    args = ["eval", "--model", tiny_model_dir, "--dataset", "gsm8k", "--split", "train", "--max-samples", "2"]
    args += ["--prompt-template", "Q: {problem}", "--system-prompt", "Be brief.", "--n", "3", "--k", "1"]
    args += ["--batch-size", "4", "--seed", "5", "--width", "2", "--merge", "averaged", "--temperature", "0.7"]
    args += ["--top-p", "0.9", "--top-k", "7", "--min-p", "0.05", "--thinking-end", "</think>"]
    args += ["--max-thinking-tokens", "6", "--max-new-tokens", "9", "--output", str(out), "--device", "cpu"]
    assert cli.main(args) == 0

    assert [len(conversations) for conversations, _ in calls] == [4, 2]  # 2 problems x 3 samples, 4 rows a batch
    prompts = {json.dumps(m) for conversations, _ in calls for m in conversations}
    assert len(prompts) == 2
    for messages in map(json.loads, prompts):
        system, user = messages
        assert system == {"role": "system", "content": "Be brief."} and user["content"].startswith("Q: ")
    assert any("Q: Natalia sold clips" in p for p in prompts)  # the train split's first problem
    expected = {"mixer": "multiplex", "width": 2, "mixer_params": {"merge": "averaged"}, "temperature": 0.7}
    expected.update(top_p=0.9, top_k=7, min_p=0.05, thinking_end="</think>", max_thinking_tokens=6, max_new_tokens=9)
    assert {json.dumps(dataclasses.asdict(d), sort_keys=True) for _, d in calls} == {
        json.dumps(expected, sort_keys=True)
    }
    assert seeds and set(seeds) == {5}
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["seed"] == 5 and settings["batch_size"] == 4
    (method,) = settings["methods"].values()
    assert {k: method[k] for k in expected} == expected
    assert (method["prompt_template"], method["system_prompt"], method["split"]) == (
        "Q: {problem}",
        "Be brief.",
        "train",
    )


def test_eval_resume_refuses_other_prompts(eval_args, capsys):
    """The prompt decides what a sample is: resuming a folder with another template or system prompt would mix two
    experiments in one pass@k."""
    args, out = eval_args
    assert cli.main(args) == 0
    capsys.readouterr()
    for flag, value in [("--prompt-template", "Q: {problem}"), ("--system-prompt", "Be brief.")]:
        assert cli.main([*args, flag, value]) == 2
        assert "other settings" in capsys.readouterr().err


def test_eval_resume_with_fewer_samples_or_problems_uses_the_first_ones(eval_args, count_rows):
    """A rerun with a smaller --n or --max-samples draws nothing and scores the samples it names from samples.jsonl."""
    args, out = eval_args
    assert cli.main(args) == 0
    records = _records(out)
    count_rows.clear()
    i = args.index("--n")
    smaller = [*args[:i], "--n", "2", "--k", "1,2", *args[i + 4 :], "--max-samples", "2"]
    assert cli.main(smaller) == 0 and sum(count_rows) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    for method, metrics in next(iter(results.values())).items():
        assert metrics["problems"] == 2 and metrics["n"] == 2
        mine = [r for r in records if r["method"] == method and r["problem"] < 2 and r["sample"] < 2]
        assert metrics["pass@k"]["1"] == pytest.approx(sum(r["correct"] for r in mine) / 4)
        assert metrics["mean_length"] == pytest.approx(sum(r["length"] for r in mine) / 4)


def test_eval_adding_a_dataset_draws_its_samples(eval_args, count_rows, tmp_path):
    """A sample is identified by dataset, method, problem and sample: a second dataset's samples are not the first's."""
    args, out = eval_args
    other = tmp_path / "other.jsonl"
    other.write_text('{"problem": "4+4", "answer": "8"}\n{"problem": "5+1", "answer": "6"}\n')
    assert cli.main(args) == 0
    count_rows.clear()
    assert cli.main([*args, "--dataset", str(other)]) == 0
    assert sum(count_rows) == 2 * 4 * 2  # only the new dataset's problems x n x methods
    assert sum(r["dataset"] == str(other) for r in _records(out)) == 16
    results = json.loads((out / "results.json").read_text())["results"]
    assert results[str(other)]["discrete"]["problems"] == 2


def test_load_problems_prefers_the_test_split_of_a_local_or_hub_dataset(tmp_path):
    """`--split` defaults to test: a saved DatasetDict or a folder of train/test files was evaluated on its train
    split (the problems a model was trained on)."""
    import datasets

    train = datasets.Dataset.from_list([{"problem": "train problem", "answer": "1"}])
    test = datasets.Dataset.from_list([{"problem": "test problem", "answer": "2"}])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "folder").mkdir()
    train.to_json(str(tmp_path / "folder" / "train.jsonl"))
    test.to_json(str(tmp_path / "folder" / "test.jsonl"))
    for path in (tmp_path / "saved", tmp_path / "folder"):
        assert load_problems(str(path))["answer"] == ["2"], path
        assert load_problems(str(path), split="train")["answer"] == ["1"], path
    train.to_json(str(tmp_path / "one.jsonl"))  # a single file has only a train split: that one
    assert load_problems(str(tmp_path / "one.jsonl"))["answer"] == ["1"]
