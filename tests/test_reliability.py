"""Faults: failing rewards, NaNs, resume, SIGTERM, determinism, secrets."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import TrainerCallback

from multiplex_trl import MultiplexGRPOTrainer
from multiplex_trl.testing import tiny_model


sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import _args, _dataset, _trainer, length_reward  # noqa: E402


def _batch(tr, n=4):
    return tr._generate_and_score_completions([{"prompt": p} for p in _dataset(n)["prompt"]])


def flaky_reward(prompts, completions, **kwargs):
    """Fails on the prompt '2+2?' (sample 2 of `_batch`)."""
    return [1 / 0 if "2+2" in p[-1]["content"] else 1.0 for p in prompts]


def test_raising_reward_names_the_function_and_the_sample(tmp_path, tok):
    tr = _trainer(tok, tiny_model(tok), _args(tmp_path), reward_funcs=[length_reward, flaky_reward])
    with pytest.raises(RuntimeError, match=r"reward function 'flaky_reward' raised on sample 2 .*ZeroDivisionError"):
        _batch(tr)


def test_raising_reward_scores_none_when_asked(tmp_path, tok):
    tr = _trainer(tok, tiny_model(tok), _args(tmp_path, reward_error="none"), reward_funcs=[flaky_reward])
    batch = _batch(tr)
    assert batch["advantages"][2] == 0.0  # unscorable: TRL zeroes its advantage
    logged = list(tr._logs["rewards"]["flaky_reward"])
    assert logged[2] != logged[2] and logged[:2] + logged[3:] == [1.0] * 3  # NaN for the failing sample only


def batch_only_reward(completions, **kwargs):
    """Scores one completion at a time but fails on a batch (a bug that only a batch shows)."""
    if len(completions) > 1:
        raise RuntimeError("batch too large")
    return [1.0]


@pytest.mark.parametrize("policy", ["raise", "none"])
def test_reward_that_fails_only_on_the_batch(tmp_path, tok, policy):
    """reward_error='raise' stops the run even when every sample scores alone (rewards computed one sample at a time
    would hide the function's bug); 'none' keeps the samples' own rewards."""
    tr = _trainer(tok, tiny_model(tok), _args(tmp_path, reward_error=policy), reward_funcs=[batch_only_reward])
    if policy == "raise":
        with pytest.raises(RuntimeError, match="reward function 'batch_only_reward' raised on the batch: .*too large"):
            _batch(tr)
    else:
        _batch(tr)
        assert list(tr._logs["rewards"]["batch_only_reward"]) == [1.0] * 4


def test_reward_that_returns_none_for_all_is_refused(tmp_path, tok):
    tr = _trainer(
        tok, tiny_model(tok), _args(tmp_path), reward_funcs=lambda completions, **kw: [None] * len(completions)
    )
    with pytest.raises(ValueError, match="every reward function returned None for every completion at step 0"):
        _batch(tr)


def test_reward_of_wrong_length_is_refused(tmp_path, tok):
    tr = _trainer(tok, tiny_model(tok), _args(tmp_path), reward_funcs=lambda completions, **kw: [1.0])
    with pytest.raises(ValueError, match="returned 1 rewards, but 4 were expected"):
        _batch(tr)


def test_nan_logits_stop_the_run_before_the_weights_change(tmp_path, tok):
    model = tiny_model(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = _trainer(tok, model, _args(tmp_path, max_steps=3))

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                with torch.no_grad():
                    model.model.norm.weight.fill_(float("nan"))
                nonlocal_snapshot.update({n: p.detach().clone() for n, p in model.named_parameters()})

    nonlocal_snapshot = {}
    tr.add_callback(Poison())
    with pytest.raises(FloatingPointError, match="non-finite logits during the rollout at step 1"):
        tr.train()
    for n, p in model.named_parameters():  # nothing after the poisoning reached the weights
        assert torch.equal(p, nonlocal_snapshot[n]) or torch.isnan(p).all(), n
    assert any(not torch.equal(before[n], nonlocal_snapshot[n]) for n in before)  # step 0 did train


def test_nan_loss_is_caught_before_backward(tmp_path, tok):
    model = tiny_model(tok)
    tr = _trainer(tok, model, _args(tmp_path))
    batch = _batch(tr)
    batch["advantages"] = torch.full_like(batch["advantages"], float("nan"))
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
        tr._compute_loss(tr.model, batch)


def _train(tmp_path, tok, name, **kw):
    model = tiny_model(tok)
    args = _args(tmp_path / name, max_steps=4, lr_scheduler_type="constant", learning_rate=5e-3, **kw)
    tr = _trainer(tok, model, args)
    return tr, model


def test_same_seed_same_rollouts_and_loss(tmp_path, tok):
    runs = []
    for name in ("a", "b"):
        tr, model = _train(tmp_path, tok, name)
        tr.train()
        runs.append(
            (
                [h.get("loss") for h in tr.state.log_history],
                [h.get("reward") for h in tr.state.log_history],
                [p.detach().clone() for p in model.parameters()],
            )
        )
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))


def test_resume_reaches_the_same_metrics_as_an_uninterrupted_run(tmp_path, tok):
    full, full_model = _train(tmp_path, tok, "full", save_strategy="no")
    full.train()

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True
                control.should_save = True

    first, _ = _train(tmp_path, tok, "resumed", save_strategy="no")
    first.add_callback(StopAt2())
    first.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").exists()

    second, resumed_model = _train(tmp_path, tok, "resumed", save_strategy="no")
    second.train(resume_from_checkpoint=str(checkpoint))
    metrics = ("loss", "reward", "multiplex/branch_rate", "multiplex/thinking_length")
    full_logs = [{k: h[k] for k in metrics} for h in full.state.log_history if "loss" in h]
    resumed_logs = [{k: h[k] for k in metrics} for h in second.state.log_history if "loss" in h]
    assert resumed_logs[-2:] == full_logs[-2:]  # steps 3 and 4
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b)


def test_resume_at_a_generation_boundary_with_accumulation_and_iterations_is_exact(tmp_path, tok):
    """A rollout serves 2 micro-batches x 2 iterations, one generation per 2 optimizer steps, with old-policy
    log-probs from the multiplex pass (accumulation misaligned with generation): a run resumed from checkpoint-2 (a
    generation boundary) draws the same slots and ends with the same weights as an uninterrupted one (README: Faults)."""
    kw = {"num_iterations": 2, "gradient_accumulation_steps": 2, "steps_per_generation": 2}
    kw |= {"per_device_train_batch_size": 2, "save_strategy": "steps", "save_steps": 2}
    full, full_model = _train(tmp_path, tok, "full", **kw)
    full.train()
    resumed, resumed_model = _train(tmp_path, tok, "resumed", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    logs = [
        [(h["step"], h["loss"], h.get("reward")) for h in t.state.log_history if "loss" in h] for t in (full, resumed)
    ]
    assert logs[1] == logs[0] and len(logs[0]) == 4
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from transformers import TrainerCallback
    from multiplex_trl.testing import tiny_model, tiny_tokenizer
    from test_trainer import _args, _trainer
    tok = tiny_tokenizer()
    tr = _trainer(tok, tiny_model(tok), _args({out!r}, max_steps=10_000, save_strategy="no"))
    class Announce(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            print("STEP", state.global_step, flush=True)
    tr.add_callback(Announce())
    tr.train()
    print("EXITED CLEANLY", tr.state.global_step, flush=True)
    """
)


@pytest.mark.slow
def test_sigterm_saves_a_usable_checkpoint_and_stops(tmp_path):
    out = tmp_path / "run"
    script = SIGTERM_SCRIPT.format(tests=os.path.dirname(__file__), out=str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("STEP 3"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    lines += rest.splitlines()
    assert proc.returncode == 0, lines[-5:]
    assert any(line.startswith("EXITED CLEANLY") for line in lines)
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, "no checkpoint was saved on SIGTERM"
    last = checkpoints[-1]
    assert int(last.name.split("-")[1]) >= 3
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(last)
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())
    assert (last / "trainer_state.json").exists() and (last / "optimizer.pt").exists()


def test_hub_token_never_reaches_saved_configs_or_logs(tmp_path, tok, capsys):
    secret = "hf_SECRETtoken1234567890"
    tr = _trainer(
        tok, tiny_model(tok), _args(tmp_path, hub_token=secret, save_strategy="steps", save_steps=1, report_to="none")
    )
    tr.train()
    tr.save_model(str(tmp_path / "final"))
    assert tr.args.hub_token == secret  # still usable for pushing
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    args = torch.load(tmp_path / "final" / "training_args.bin", weights_only=False)
    assert args.hub_token is None
    assert secret not in tr.args.to_json_string()
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err
    assert isinstance(tr, MultiplexGRPOTrainer)


def test_async_reward_functions_keep_trls_async_path(tmp_path, tok):
    async def async_reward(completions, **kwargs):
        return [0.5] * len(completions)

    tr = _trainer(tok, tiny_model(tok), _args(tmp_path), reward_funcs=[async_reward, length_reward])
    batch = _batch(tr)
    assert list(tr._logs["rewards"]["async_reward"]) == [0.5] * 4
    assert torch.isfinite(batch["advantages"]).all()


def test_prompt_longer_than_the_model_allows_is_one_clear_error(tmp_path, tok):
    model = tiny_model(tok)
    model.config.max_position_embeddings = 24  # the chat prompt (~14 tokens) + 20 completion tokens do not fit
    tr = _trainer(tok, model, _args(tmp_path))
    with pytest.raises(ValueError, match=r"a prompt of \d+ tokens plus max_completion_length=20 exceeds the model's"):
        _batch(tr)
    # a prompt and completion that fill the positions exactly fit: the last completion token is the last position
    texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in _dataset(4)["prompt"]]
    longest = max(len(tok(t, add_special_tokens=False).input_ids) for t in texts)
    model.config.max_position_embeddings = longest + 20
    assert _batch(tr)["completion_mask"].any()


def test_model_without_input_embeddings_is_refused(tmp_path, tok, monkeypatch):
    model = tiny_model(tok)
    monkeypatch.setattr(type(model), "get_input_embeddings", lambda self: None)
    with pytest.raises(ValueError, match="the model has no input embeddings"):
        _trainer(tok, model, _args(tmp_path))


def test_tokenizer_without_pad_token_falls_back_to_eos(tmp_path):
    from multiplex_trl.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.pad_token = None
    tr = _trainer(tok, tiny_model(tok), _args(tmp_path))  # TRL's rule: pad = eos
    assert tok.pad_token_id == tok.eos_token_id
    batch = _batch(tr)
    assert batch["completion_mask"].any()


def test_a_later_train_call_is_not_stopped_by_an_earlier_sigterm(tmp_path, tok):
    """`preempted` is about the last `train()`: after a SIGTERM-stopped run, resuming in the same process trains to
    max_steps and is not reported as preempted (the flag stayed set, so it stopped again after one step)."""

    class TermAtStep1(TrainerCallback):
        sent = False

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1 and not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler is installed while train() runs

    tr = _trainer(tok, tiny_model(tok), _args(tmp_path, max_steps=4))
    tr.add_callback(TermAtStep1())
    tr.train()
    assert tr.preempted and tr.state.global_step == 2
    tr.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert tr.state.global_step == 4
    assert not tr.preempted


def test_nan_logits_with_the_dirichlet_mixer_name_the_step(tmp_path, tok):
    """The dirichlet mixer samples its weights with torch's Dirichlet, which refuses NaN concentrations with a
    ValueError of its own: the run must stop with the same non-finite error (and step) as the other mixers."""
    model = tiny_model(tok)
    tr = _trainer(tok, model, _args(tmp_path, mixer="dirichlet"))
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite logits during the rollout at step 0"):
        _batch(tr)


def test_nan_loss_is_caught_on_trls_own_path_too(tmp_path, tok):
    """Width 1 with vLLM runs TRL's own rollout and loss (`multiplex` False): README's non-finite-loss guard holds
    there too (it returned TRL's loss unchecked)."""
    tr = _trainer(tok, tiny_model(tok), _args(tmp_path))
    batch = _batch(tr)
    tr.multiplex = False  # what MultiplexGRPOTrainer sets for multiplex_width=1, use_vllm=True (vLLM not needed here)
    batch["advantages"] = torch.full_like(batch["advantages"], float("nan"))
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
        tr._compute_loss(tr.model, batch)
