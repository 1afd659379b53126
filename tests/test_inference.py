import json
import re
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from multiplex_trl import inference
from multiplex_trl.inference import (
    Sample,
    UsageError,
    find_model,
    format_branches,
    generate,
    resolve_decoding,
    to_messages,
)
from multiplex_trl.mixers import MIXERS, Soft


def _first_token_counts(tokens, vocab):
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double()


def _chi_square(counts, probs):
    """Pearson's statistic and degrees of freedom, bins with expected count < 5 pooled into one."""
    expected = probs.double() * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    return float(((obs - exp) ** 2 / exp).sum()), int(big.sum())  # df = bins - 1 (the pooled bin included)


def _passes(counts, probs):
    stat, df = _chi_square(counts, probs)
    return stat < df + 5 * (2 * df) ** 0.5  # about 5 standard deviations above the chi-square mean


def test_width_one_samples_like_model_generate(tok, model):
    """K=1 is ordinary sampling: the first token follows the same distribution as `model.generate(do_sample=True)`."""
    n = 4000
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        probs = model(**enc).logits[0, -1].float().softmax(-1)
    ours = generate(model, "hi", tokenizer=tok, width=1, num_samples=n, batch_size=n, max_new_tokens=1, seed=0)[0]
    ours = _first_token_counts([s.ids[0, 0].item() for s in ours], len(tok))
    torch.manual_seed(0)
    with torch.no_grad():
        hf = model.generate(
            **enc, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=1, num_return_sequences=n
        )
    hf = _first_token_counts(hf[:, -1].tolist(), len(tok))
    assert _passes(ours, probs) and _passes(hf, probs)
    # The test has power: a different temperature is rejected.
    assert not _passes(ours, (torch.log(probs) / 2).softmax(-1))


def test_sharp_decoding_matches_greedy_in_batches(tok, model):
    """When the policy is sharp all K slots agree and multiplex decoding is discrete: batched, left-padded rows
    (prompts of different lengths, mixed in one batch) reproduce per-prompt greedy decoding."""
    questions = ["hi", "what is 2+2?", "a much longer question, to pad the others"]
    results = generate(
        model, questions, tokenizer=tok, width=3, temperature=1e-4, max_new_tokens=12, num_samples=2, batch_size=4
    )
    for question, samples in zip(questions, results):
        enc = tok.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            greedy = model.generate(**enc, do_sample=False, max_new_tokens=12)[0, enc["input_ids"].size(1) :].tolist()
        if tok.eos_token_id in greedy:
            greedy = greedy[: greedy.index(tok.eos_token_id) + 1]
        assert len(samples) == 2
        for sample in samples:
            assert sample.ids[:, 0].tolist() == greedy
            assert (sample.ids == sample.ids[:, :1]).logical_or(sample.weights == 0).all()  # slots agree


def test_thinking_and_answer_split(tok, model):
    samples = generate(
        model, "hi", tokenizer=tok, width=3, max_new_tokens=20, max_thinking_tokens=3, num_samples=8, seed=1
    )[0]
    assert any(s.closed for s in samples)
    for s in samples:
        assert s.ids.shape == s.weights.shape and s.ids.shape[1] == 3
        torch.testing.assert_close(s.weights.sum(-1), torch.ones(s.ids.size(0)))
        if s.closed:  # the character tokenizer decodes piecewise exactly
            assert s.text == s.thinking + "</think>" + s.answer
            assert s.thinking_length == 3
            end = s.ids[:, 0].tolist().index(tok.convert_tokens_to_ids("</think>"))
            assert (s.weights[end:, 0] == 1).all()  # the marker and the answer are one-hot
        else:  # EOS while thinking
            assert s.answer == "" and s.thinking == s.text and s.thinking_length <= 3


def test_seed_reproduces(tok, model):
    def run(seed):
        return [s.ids for s in generate(model, "hi", tokenizer=tok, max_new_tokens=10, num_samples=3, seed=seed)[0]]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))


def test_path_reads_saved_settings_and_explicit_args_win(tiny_model_dir, tmp_path):
    folder = tmp_path / "trained"
    shutil.copytree(tiny_model_dir, folder)
    settings = {"width": 2, "merge": "averaged", "thinking_end": "</think>", "max_thinking_tokens": 2}
    settings.update(temperature=1.0, top_p=1.0, top_k=None)
    (folder / "multiplex_config.json").write_text(json.dumps(settings))
    sample = generate(str(folder), "hi", max_new_tokens=6, seed=0, device="cpu")[0][0]
    assert sample.ids.shape[1] == 2 and sample.thinking_length <= 2
    if sample.thinking_length:
        assert sample.weights[0].tolist() == [0.5, 0.5]  # averaged merge
    assert generate(str(folder), "hi", width=1, max_new_tokens=6, seed=0, device="cpu")[0][0].ids.shape[1] == 1


def test_prompt_forms(tok, model):
    assert to_messages("q") == [{"role": "user", "content": "q"}]
    assert to_messages("q", "sys")[0] == {"role": "system", "content": "sys"}
    messages = [{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}]
    assert to_messages(messages, "other") == messages  # an existing system message is kept
    kwargs = {"tokenizer": tok, "max_new_tokens": 5, "seed": 0}
    by_string = generate(model, "q", **kwargs)
    by_messages = generate(model, [{"role": "user", "content": "q"}], **kwargs)
    assert torch.equal(by_string[0][0].ids, by_messages[0][0].ids)
    many = generate(model, ["a", [{"role": "user", "content": "b"}], "c"], num_samples=2, batch_size=5, **kwargs)
    assert [len(samples) for samples in many] == [2, 2, 2]


def test_format_branches(tok):
    a, b, c, pad = (tok.convert_tokens_to_ids(t) for t in ("a", "b", "c", "<pad>"))
    sample = Sample(
        text="ac",
        thinking="ac",
        answer="",
        ids=torch.tensor([[c, c, c], [a, b, a], [c, pad, pad], [c, pad, pad]]),
        weights=torch.tensor([[0.2, 0.3, 0.5], [0.3, 0.4, 0.3], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]),
        thinking_length=2,
        closed=False,
    )
    assert format_branches(sample, tok) == "c[a:0.60|b:0.40]cc"


def test_find_model_errors(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="does not exist"):
        find_model(str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="does not exist"):
        find_model("no_such_model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE"):
        find_model("nobody-xyz/not-a-cached-model")


def test_a_revision_of_a_hub_model_is_decoded_from_its_own_files(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """push_revisions pushes each checkpoint to a `step-<N>` branch: generate and eval decode one with --revision
    (they read the Hub id's default branch only). A revision of a local model, or one neither online nor cached, is
    refused in one line before anything loads."""
    import huggingface_hub

    from multiplex_trl import MultiplexGRPOConfig, cli, evaluate
    from multiplex_trl.hub import save_multiplex_settings

    branch = tmp_path / "snapshot"  # the branch's files: the checkpoint, with its settings (a thinking budget of 2)
    shutil.copytree(tiny_model_dir, branch)
    args = MultiplexGRPOConfig(output_dir=str(tmp_path), max_thinking_tokens=2, use_cpu=True, bf16=False)
    save_multiplex_settings(branch, args)
    fetched = []

    def snapshot_download(repo_id, revision=None, **kwargs):
        fetched.append((repo_id, revision))
        return str(branch)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    samples = inference.generate("me/run", "hi", revision="step-2", max_new_tokens=6, device="cpu")
    assert fetched == [("me/run", "step-2")] and samples[0][0].thinking_length <= 2  # the branch's budget
    assert cli.main(["generate", "--model", "me/run", "--revision", "step-2", "--prompt", "hi", "--device", "cpu",
                     "--max-new-tokens", "4"]) == 0  # fmt: skip
    assert fetched[-1] == ("me/run", "step-2")
    data = tmp_path / "problems.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    monkeypatch.chdir(tmp_path)
    args = [
        "eval",
        "--model",
        "me/run",
        "--dataset",
        str(data),
        "--n",
        "1",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]
    assert cli.main([*args, "--revision", "step-2"]) == 0
    results = json.loads((tmp_path / "eval" / "run-step-2" / "results.json").read_text())
    assert {m["revision"] for m in results["settings"]["methods"].values()} == {"step-2"}
    capsys.readouterr()

    monkeypatch.undo()  # the real snapshot_download: offline here, and nothing cached
    monkeypatch.setattr(inference, "load_model", _no_load)
    monkeypatch.setattr(evaluate, "load_model", _no_load)
    for model, message in [
        (tiny_model_dir, "names a revision of a Hub model, but .* is local"),
        ("nobody-xyz/not-a-cached-model", "at revision 'step-2' could not be fetched"),
    ]:
        assert cli.main(["generate", "--model", model, "--revision", "step-2", "--prompt", "hi"]) == 2
        assert cli.main([*args[:2], model, *args[3:], "--revision", "step-2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and all(re.search(message, line) for line in err), err


def _no_load(*args, **kwargs):
    raise AssertionError("the model must not be loaded for bad input")


def test_generate_cli(tiny_model_dir, capsys, monkeypatch):
    base = ["--model", tiny_model_dir, "--prompt", "hi", "--device", "cpu", "--show-branches"]
    assert inference.main([*base, "--max-new-tokens", "8", "--max-thinking-tokens", "3"]) == 0
    assert "--- multiplex(K=3): " in capsys.readouterr().out
    assert inference.main([*base, "--max-new-tokens", "4", "--mixer", "soft"]) == 0
    assert "--- soft(K=10): " in capsys.readouterr().out  # Soft Thinking's paper width
    assert inference.main([*base, "--max-new-tokens", "8", "--cache-implementation", "static"]) == 0
    assert "--- multiplex(K=3): " in capsys.readouterr().out

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(inference, "load_model", no_load)
    assert inference.main(["--model", "/no/such/folder", "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    for extra, message in [
        (["--width", "0"], "width"),
        (
            ["--mixer", "coconut"],
            "Unknown mixer 'coconut'; known: ['dirichlet', 'gumbel', 'mot_distinct', 'multiplex'",
        ),
        (["--gumbel-tau", "0.3"], "gumbel_tau is a parameter of mixer 'gumbel', not of 'multiplex'"),
        (["--mixer", "gumbel", "--gumbel-tau", "0"], "gumbel_tau must be > 0"),
        (["--compile"], "set cache_implementation='static'"),
    ]:
        assert inference.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_generate_cli_refuses_compile_when_the_window_is_shorter_than_the_completion(tmp_path, capsys, monkeypatch):
    """Read from the config alone (no weights here, and the model is never loaded)."""
    from transformers import MistralConfig

    MistralConfig(num_hidden_layers=1, sliding_window=8).save_pretrained(tmp_path)
    monkeypatch.setattr(inference, "load_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    fast = ["--cache-implementation", "static", "--compile"]
    assert inference.main(["--model", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "16", *fast]) == 2
    err = capsys.readouterr().err
    assert "sliding window (8)" in err and "no --compile" in err and len(err.strip().splitlines()) == 1


# --- mixers ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_mixer_generates_and_seed_reproduces(tok, model, name):
    def run(seed):
        kwargs = {"tokenizer": tok, "mixer": name, "width": 3, "max_new_tokens": 10, "max_thinking_tokens": 4}
        return [s for row in generate(model, ["hi", "2+2?"], num_samples=2, seed=seed, **kwargs) for s in row]

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    samples = run(0)
    assert torch.equal(torch.rand(3), expected)  # the global RNG (dirichlet's) is seeded inside, then restored
    assert any(s.thinking_length for s in samples)
    for s in samples:
        assert s.mixer == name and s.ids.shape[1] == 3 and s.ids.shape == s.weights.shape
        torch.testing.assert_close(s.weights.sum(-1), torch.ones(s.ids.size(0)))
        assert s.thinking_length <= 4
    again = run(0)
    assert all(torch.equal(a.ids, b.ids) and torch.equal(a.weights, b.weights) for a, b in zip(samples, again))


def test_the_markers_matcher_is_built_once_for_all_batches(tok, model, monkeypatch):
    """generate/eval decode batch after batch; the text marker's matcher reads the whole vocabulary (seconds for a
    150k one), so it is built once per tokenizer and marker, not once per batch."""
    from multiplex_trl import markers

    built, build = [], markers.thinking_end_automaton
    monkeypatch.setattr(markers, "thinking_end_automaton", lambda *a: built.append(a[1]) or build(*a))
    markers.closing_rule.cache_clear()
    kwargs = {"tokenizer": tok, "width": 3, "max_new_tokens": 6, "thinking_end": "ab", "batch_size": 1}
    samples = generate(model, ["hi", "2+2?", "x"], num_samples=2, seed=0, **kwargs)
    assert sum(map(len, samples)) == 6 and built == ["ab"]
    markers.closing_rule.cache_clear()


def test_soft_is_deterministic_and_takes_its_paper_settings(tok, model, monkeypatch):
    seen = []
    rollout = inference.multiplex_generate

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return rollout(*args, **kwargs)

    monkeypatch.setattr(inference, "multiplex_generate", recording)
    a = generate(model, "hi", tokenizer=tok, mixer="soft", max_new_tokens=12, num_samples=2, seed=0)[0]
    b = generate(model, "hi", tokenizer=tok, mixer="soft", max_new_tokens=12, num_samples=2, seed=1)[0]
    assert a[0].ids.shape[1] == Soft.PAPER["width"] and a[0].mixer == "soft"
    assert [s.text for s in a] == [s.text for s in b] == [a[0].text] * 2  # no randomness: seeds do not matter
    assert all(torch.equal(x.weights, y.weights) for x, y in zip(a, b))
    decoding = ("temperature", "top_p", "top_k", "min_p")
    assert {k: seen[0][k] for k in decoding} == {k: Soft.PAPER[k] for k in decoding}
    mixer = seen[0]["mixer"]
    assert mixer.name == "soft"
    assert (mixer.cold_stop_entropy, mixer.cold_stop_steps) == (0.01, 256)  # the paper's cold stop is on

    # Explicit settings win over the paper's, which win over a model's saved (multiplex) ones.
    saved = {
        "width": 2,
        "merge": "averaged",
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": None,
        "max_thinking_tokens": 5,
    }
    soft = resolve_decoding(saved, mixer="soft", temperature=0.9)
    assert (soft.width, soft.temperature, soft.top_p, soft.top_k, soft.min_p) == (10, 0.9, 0.95, 30, 0.001)
    assert soft.max_thinking_tokens == 5 and "merge" not in soft.mixer_params
    assert resolve_decoding(saved).width == 2 and resolve_decoding(saved).mixer_params == {"merge": "averaged"}


def test_mixer_settings_names_and_refusals(tok, model):
    assert resolve_decoding(None, width=1).name == "discrete"
    assert resolve_decoding(None).name == "multiplex(K=3)"
    assert resolve_decoding(None, {"merge": "averaged"}).name == "multiplex(K=3, merge=averaged)"
    assert resolve_decoding(None, mixer="soft").name == "soft(K=10)"
    assert resolve_decoding(None, {"gumbel_tau": 0.3}, mixer="gumbel").name == "gumbel(K=3, gumbel_tau=0.3)"
    # A saved mixer and its parameters are read when multiplex_config.json has them.
    saved = resolve_decoding({"mixer": "dirichlet", "dirichlet_gamma": 2.0, "width": 4})
    assert (saved.mixer, saved.width, saved.mixer_params) == ("dirichlet", 4, {"dirichlet_gamma": 2.0})

    sample = generate(model, "hi", tokenizer=tok, mixer="gumbel", gumbel_tau=0.3, max_new_tokens=4, seed=0)[0][0]
    assert sample.mixer == "gumbel"
    with pytest.raises(UsageError, match=r"Unknown mixer 'coconut'; known: \['dirichlet'"):
        generate(model, "hi", tokenizer=tok, mixer="coconut")
    with pytest.raises(UsageError, match="merge is a parameter of mixer 'multiplex', not of 'soft'"):
        generate(model, "hi", tokenizer=tok, mixer="soft", merge="averaged")
    with pytest.raises(UsageError, match="Unknown mixer parameter 'tau'"):
        generate(model, "hi", tokenizer=tok, mixer="gumbel", tau=0.3)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0."),
        (["--num-samples", "0"], "--num-samples must be an integer >= 1, got 0."),
        (["--num-samples", "-1"], "--num-samples must be an integer >= 1, got -1."),
    ],
    ids=["batch size 0", "0 samples", "-1 samples"],
)
def test_generate_refuses_counts_below_one_before_loading(tiny_model_dir, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(inference, "load_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    assert inference.main(["--model", tiny_model_dir, "--prompt", "hi", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    name, value = flags[0][2:].replace("-", "_"), int(flags[1])
    with pytest.raises(UsageError, match=f"{name} must be an integer >= 1, got {value}"):
        generate(tiny_model_dir, "hi", **{name: value})


def test_a_special_token_marker_is_one_line_error(tiny_model_dir, tmp_path, capsys):
    """generate with a marker its tokenizer marks special (dropped from the decoded text, so nothing would be graded):
    one line after the model loads, no traceback."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["[/THINK]"]})
    tokenizer.save_pretrained(model_dir)
    args = ["--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "4", "--thinking-end", "[/THINK]"]
    assert inference.main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the weights' loading bar
    assert last.startswith("multiplex-trl generate: error: thinking_end='[/THINK]' is a special token of this")


def test_a_template_that_closes_thinking_is_one_line_error(tiny_model_dir, tmp_path, capsys):
    """A chat template that renders thinking already closed leaves no thinking phase: generate and eval say so in one
    line after the model loads (they decoded the answer as multiplex thinking), and eval writes nothing."""
    import re
    import shutil

    from transformers import AutoTokenizer

    from multiplex_trl import cli
    from multiplex_trl.testing import CHAT_TEMPLATE

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    opening = "{% if add_generation_prompt %}<|assistant|><think>{% endif %}"
    tokenizer.chat_template = CHAT_TEMPLATE.replace(opening, opening.replace("<think>", "<think></think>\n"))
    tokenizer.save_pretrained(model_dir)
    message = r"error: a prompt already ends with thinking_end='</think>' \(\.\.\.'.*<think></think>\\n'\), so its"
    assert inference.main(["--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "4"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the weights' loading bar
    assert re.match("multiplex-trl generate: " + message, last)

    data = tmp_path / "problems.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    out = tmp_path / "out"
    args = ["eval", "--model", str(model_dir), "--dataset", str(data), "--n", "1", "--max-new-tokens", "4"]
    assert cli.main([*args, "--output", str(out), "--device", "cpu"]) == 2
    assert re.match("multiplex-trl eval: " + message, capsys.readouterr().err.strip().splitlines()[-1])
    assert not out.exists()  # checked before anything is written: no results.json to block a corrected rerun


@pytest.fixture
def rollouts(monkeypatch):
    """Records the arguments of every rollout `generate` and the CLI run (and the seeds of their generators)."""
    calls, seeds = [], []
    rollout, make_generator = inference.multiplex_generate, inference.make_generator

    def recording(model, input_ids, attention_mask, **kwargs):
        calls.append({"input_ids": input_ids, **kwargs})
        return rollout(model, input_ids, attention_mask, **kwargs)

    monkeypatch.setattr(inference, "multiplex_generate", recording)
    monkeypatch.setattr(
        inference, "make_generator", lambda seed, device: seeds.append(seed) or make_generator(seed, device)
    )
    return calls, seeds


FILTERS = {"temperature": 0.7, "top_p": 0.9, "top_k": 7, "min_p": 0.05, "max_thinking_tokens": 2, "max_new_tokens": 6}


def test_generate_arguments_reach_the_rollout(tok, model, rollouts):
    calls, seeds = rollouts
    model.generation_config.eos_token_id = [tok.eos_token_id, 9]  # e.g. a chat model's end-of-turn token
    samples = generate(
        model, ["hi", "yo"], tokenizer=tok, width=2, merge="averaged", system_prompt="Be brief.", num_samples=2,
        batch_size=3, seed=5, **FILTERS,
    )  # fmt: skip
    assert [len(s) for s in samples] == [2, 2] and [c["input_ids"].size(0) for c in calls] == [3, 1]
    assert seeds == [5]
    for call in calls:
        assert {k: call[k] for k in FILTERS} == FILTERS
        assert (call["width"], call["mixer"].name, call["mixer"].merge) == (2, "multiplex", "averaged")
        assert call["eos_token_ids"] == [tok.eos_token_id, 9]
        for row in call["input_ids"]:
            assert tok.decode(row, skip_special_tokens=True).startswith("Be brief.")  # the system message first


def test_generate_cli_flags_reach_the_rollout(tiny_model_dir, rollouts, capsys):
    calls, seeds = rollouts
    args = ["--model", tiny_model_dir, "--prompt", "hi", "--device", "cpu", "--num-samples", "3", "--batch-size", "2"]
    args += ["--seed", "5", "--system-prompt", "Be brief.", "--width", "2", "--merge", "averaged"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in FILTERS.items()] + ["--thinking-end", "A:"]
    assert inference.main(args) == 0
    assert capsys.readouterr().out.count("=== prompt 0, sample") == 3
    assert [c["input_ids"].size(0) for c in calls] == [2, 1] and seeds == [5]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for call in calls:
        assert {k: call[k] for k in FILTERS} == FILTERS
        assert call["thinking_end_ids"] == tok.encode("A:", add_special_tokens=False)
        assert (call["width"], call["mixer"].name, call["mixer"].merge) == (2, "multiplex", "averaged")
        assert tok.decode(call["input_ids"][0], skip_special_tokens=True).startswith("Be brief.")


def test_eos_ids_are_the_generation_configs_and_the_tokenizers(tok, model):
    """As TRL collects them: a chat model's end-of-turn token in generation_config.json also ends a completion."""
    assert inference.eos_token_ids(model, tok) == [tok.eos_token_id]
    model.generation_config.eos_token_id = [5, 6]
    assert inference.eos_token_ids(model, tok) == [tok.eos_token_id, 5, 6]
    model.generation_config.eos_token_id = [6, tok.eos_token_id]
    assert inference.eos_token_ids(model, tok) == [6, tok.eos_token_id]


@pytest.mark.parametrize(
    "text, thinking, answer, closing",
    [
        ("x x Answer: 7", "x x ", " 7", ["ĠAnswer", ":"]),  # after a space
        ("x **Answer:** 7 Answer: 7", "x **", "** 7 Answer: 7", ["Answer", ":**"]),  # merged; written again later
    ],
)
def test_a_text_marker_written_by_other_tokens_closes_thinking(text, thinking, answer, closing):
    """With --thinking-end "Answer:" a model may write the marker on its own line (`Answer` `:`), after a space
    (`ĠAnswer` `:`) or in bold (`Answer` `:**`); the rewards find it in the text whichever tokens wrote it, so each
    closes thinking, and the sample's thinking and answer split at its first place, as the rewards split. Before, such
    rows thought on through the answer (2 of 64 SmolLM2 demo samples)."""
    from conftest import Scripted, byte_level_tokenizer

    from multiplex_trl.inference import Decoding, decode_batch
    from multiplex_trl.markers import thinking_end_ids
    from multiplex_trl.testing import tiny_model

    tokenizer = byte_level_tokenizer()
    assert tokenizer.convert_ids_to_tokens(thinking_end_ids(tokenizer, "Answer:")) == ["Answer", ":"]
    stream = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert tokenizer.unk_token_id not in stream
    closes = next(t for t in range(len(stream)) if "Answer:" in tokenizer.decode(stream[: t + 1]))
    assert tokenizer.convert_ids_to_tokens(stream[closes - 1 : closes + 1]) == closing

    def bias(step):
        logits = torch.full((len(tokenizer),), -1e4)
        logits[stream[min(step, len(stream) - 1)]] = 0.0
        return logits

    model = tiny_model(tokenizer)
    scripted = Scripted(model, bias)
    scripted.generation_config = model.generation_config
    decoding = Decoding(
        mixer="multiplex", width=3, mixer_params={"merge": "weighted"}, temperature=1.0, top_p=1.0, top_k=None,
        min_p=None, thinking_end="Answer:", max_thinking_tokens=None, max_new_tokens=12,
    )  # fmt: skip
    (sample,) = decode_batch(scripted, tokenizer, [[{"role": "user", "content": "x"}]], decoding)
    assert sample.closed and sample.text == text
    assert (sample.thinking, sample.answer) == (thinking, answer)
    assert sample.thinking_length == closes  # the positions before the one that completes the marker


def test_both_forms_of_a_text_marker_close_on_a_sentencepiece_tokenizer():
    """Llama / Mistral style (Metaspace): "Answer:" alone encodes as `▁Answer` `:`, the form after a space; the form on
    a line of its own, `Answer` `:` (what a prompt asking for an "Answer:" line gets), closes thinking too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from multiplex_trl.markers import automaton_state, thinking_end_automaton, thinking_end_ids

    words = ["<pad>", "<eos>", "<unk>", "▁Answer", "Answer", ":", "▁", "▁x", "x", "\n"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="first"), pre_tokenizers.Split("\n", behavior="isolated")]
        + [pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    own_line = tokenizer.encode("x\nAnswer:", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(own_line) == ["▁x", "\n", "Answer", ":"]
    marker = thinking_end_ids(tokenizer, "Answer:")
    assert tokenizer.convert_ids_to_tokens(marker) == ["▁Answer", ":"]
    table = thinking_end_automaton(tokenizer, "Answer:", marker).tolist()
    assert automaton_state(table, own_line)[1] == 4
    assert automaton_state(table, tokenizer.encode("x Answer:", add_special_tokens=False))[1] == 3
    assert automaton_state(table, tokenizer.encode("x Answer x:", add_special_tokens=False))[1] is None


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"max_thinking_tokens": -1}, "max_thinking_tokens must be >= 0"),
    ],
)
def test_bad_decoding_settings_are_refused(setting, message):
    with pytest.raises(UsageError, match=message):
        resolve_decoding(None, **setting)


def test_generate_refuses_compile_when_the_window_is_shorter_than_the_completion(tmp_path, monkeypatch):
    """generate() with a model path reads the window from the config before it loads the model, as the CLI does."""
    from transformers import MistralConfig

    MistralConfig(num_hidden_layers=1, sliding_window=8).save_pretrained(tmp_path)
    monkeypatch.setattr(inference, "load_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    with pytest.raises(inference.UsageError, match=r"sliding window \(8\)") as error:
        inference.generate(str(tmp_path), "hi", max_new_tokens=16, cache_implementation="static", compile=True)
    assert "\n" not in str(error.value)
