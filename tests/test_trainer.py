import copy
import inspect
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

import multiplex_trl.trainer as trainer_module
from multiplex_trl import MultiplexGRPOConfig, MultiplexGRPOTrainer
from multiplex_trl.config import TRL_LOSS_TYPES
from multiplex_trl.logprobs import multiplex_logprobs
from multiplex_trl.testing import tiny_model, tiny_moe_model, tiny_tokenizer


def _dataset(n=8):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+{i}?"}] for i in range(n)]})


def length_reward(completions, **kwargs):
    return [float(len(c[0]["content"]) % 5) for c in completions]


def _args(tmp_path, **kw):
    base = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 20,
        "max_steps": 1,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "logging_steps": 1,
        "save_strategy": "no",
        "beta": 0.0,
        "learning_rate": 1e-2,
        "max_thinking_tokens": 8,
        "seed": 0,
    }
    base.update(kw)
    return MultiplexGRPOConfig(**base)


def _trainer(tok, model, args, **kw):
    return MultiplexGRPOTrainer(
        model=model,
        reward_funcs=kw.pop("reward_funcs", length_reward),
        args=args,
        train_dataset=_dataset(),
        processing_class=tok,
        **kw,
    )


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _generate_batch(tr, n):
    """One generation batch of `n` rows through the trainer's hook (rows in input order, not shuffled)."""
    return tr._generate_and_score_completions([{"prompt": p} for p in _dataset(n)["prompt"]])


def _likely_marker(model, tok, strength=1.0):
    """Point the LM head's `</think>` row along the mean final hidden state, so that some rows sample the marker
    within a small thinking budget (the random tiny model never does); returns the model."""
    marker = tok.convert_tokens_to_ids("</think>")
    ids = tok("<|user|>1+1?<eos><|assistant|><think>abc def 123", return_tensors="pt").input_ids
    with torch.no_grad():
        mean = model.model(input_ids=ids).last_hidden_state[0].mean(0)
        head = model.lm_head.weight
        head[marker] = strength * head.norm(dim=-1).mean() * mean / mean.norm()
    return model


def test_train_logs_multiplex_metrics_and_updates_weights(tmp_path, tok):
    model = tiny_model(tok)
    before = _params(model)
    tr = _trainer(tok, model, _args(tmp_path, max_steps=2))
    tr.train()
    logs = tr.state.log_history[0]
    for key in ("branch_rate", "distinct_per_step", "thinking_length", "closed_thinking_rate"):
        assert f"multiplex/{key}" in logs
    assert 0.0 < logs["multiplex/branch_rate"] <= 1.0
    assert 1.0 <= logs["multiplex/distinct_per_step"] <= 3.0
    assert 0.0 < logs["multiplex/thinking_length"] <= 8.0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_logged_multiplex_metrics_match_the_batch(tmp_path, tok):
    """Each multiplex metric equals its value recomputed from the batch's slots: branch_rate (thinking positions whose
    K draws are not all equal), distinct_per_step, thinking_length, and closed_thinking_rate, which counts the rows
    that sampled the marker themselves, not those whose marker the thinking budget forced."""
    rows = 8
    model = _likely_marker(tiny_model(tok), tok)
    tr = _trainer(tok, model, _args(tmp_path, max_thinking_tokens=4, per_device_train_batch_size=rows))
    tr.model.train()
    batch = _generate_batch(tr, rows)
    marker = tok.convert_tokens_to_ids("</think>")
    slots, think, mask = batch["multiplex_ids"], batch["thinking_mask"], batch["completion_mask"].bool()
    forced = (batch.get("tool_mask", torch.ones_like(mask)) == 0) & mask  # budget-forced marker tokens
    distinct, closed = [], 0  # distinct tokens at each thinking position; rows that closed thinking themselves
    for row in range(rows):
        n = int(think[row].sum())
        assert think[row, :n].all()  # thinking is a prefix of the completion
        distinct += [len(set(slots[row, t].tolist())) for t in range(n)]
        closed += bool(mask[row, n] and slots[row, n, 0] == marker and not forced[row, n]) if n < mask.size(1) else 0
    expected = {
        "branch_rate": sum(d > 1 for d in distinct) / len(distinct),
        "distinct_per_step": sum(distinct) / len(distinct),
        "thinking_length": len(distinct) / rows,
        "closed_thinking_rate": closed / rows,
    }
    # the batch tells the wrong rules apart: some positions did not branch, some rows closed by themselves and some
    # were forced to (a forced row holds the marker as a sampled one would, one position after its last thought)
    assert 0 < expected["branch_rate"] < 1 and expected["distinct_per_step"] > 1
    assert 0 < closed < rows and 0 < int(forced.any(-1).sum()) < rows
    logged = {k.removeprefix("multiplex/"): v for k, v in tr._metrics["train"].items() if k.startswith("multiplex/")}
    assert logged.keys() == expected.keys()
    for key, value in expected.items():
        assert logged[key] == [pytest.approx(value, abs=1e-6)], key


def test_evaluation_logs_multiplex_metrics_as_eval_metrics(tmp_path, tok):
    """Rollouts of an evaluation (model in eval mode) log their multiplex metrics with the eval metrics, as TRL logs
    its own: `evaluate()` returns eval_multiplex/*, and nothing of the evaluation lands in the training metrics."""
    tr = MultiplexGRPOTrainer(
        model=tiny_model(tok),
        reward_funcs=length_reward,
        args=_args(tmp_path, per_device_eval_batch_size=4),
        train_dataset=_dataset(),
        eval_dataset=_dataset(4),
        processing_class=tok,
    )
    metrics = tr.evaluate()
    for key in ("branch_rate", "distinct_per_step", "thinking_length", "closed_thinking_rate"):
        assert f"eval_multiplex/{key}" in metrics, key
    assert 0.0 < metrics["eval_multiplex/thinking_length"] <= 8.0
    assert not any(k.startswith("multiplex/") for k in tr._metrics["train"])


@pytest.mark.parametrize("mixer", ["mot_distinct", "dirichlet"])
def test_the_configured_mixer_draws_the_slots_and_weights_the_logprobs(tmp_path, tok, mixer):
    """`mixer` reaches the rollout and every log-prob pass: MoT-G draws K distinct tokens per thinking position
    (without replacement / the top K; no filter here), and the old-policy log-probs TRL computes are MoT-G's
    sum_j w_j log pi(k_j), not multiplex's sum over the K slots."""
    # num_iterations=2 with one accumulation step: generation and optimizer steps are misaligned, so TRL scores the
    # old policy through the trainer's log-prob hook right after generation
    tr = _trainer(tok, tiny_model(tok), _args(tmp_path, mixer=mixer, multiplex_width=3, num_iterations=2))
    batch = _generate_batch(tr, 4)
    slots, weights, think = batch["multiplex_ids"], batch["multiplex_weights"], batch["thinking_mask"]
    assert think.sum() >= 8
    equal_pairs = (slots[think].unsqueeze(-1) == slots[think].unsqueeze(-2)).sum((-1, -2))  # [N], K*K pairs
    assert (equal_pairs == 3).all(), equal_pairs.tolist()  # only the diagonal: the K ids are pairwise distinct
    mask = batch["completion_mask"].bool()
    stored = (tr.model, batch["prompt_ids"], batch["prompt_mask"], slots, weights, batch["completion_mask"])
    with torch.no_grad():
        ours = multiplex_logprobs(*stored, temperature=tr.temperature, thinking_mask=think, mixer=mixer)
        summed = multiplex_logprobs(*stored, temperature=tr.temperature, thinking_mask=think, mixer="multiplex")
    old = batch["old_per_token_logps"]
    torch.testing.assert_close(old[mask], ours[mask], atol=1e-5, rtol=0)
    assert ((old - summed)[think].abs() > 1e-2).all()  # the two rules differ at every thinking position


def test_the_rollout_closes_thinking_where_the_text_writes_a_text_marker(tmp_path, monkeypatch):
    """The trainer's rollout gets the text matcher of a multi-token marker: it accepts every token sequence the
    rewards read as the marker (`ĠAnswer` `:` after a space, `Answer` `:**` in bold), and no other."""
    from conftest import byte_level_tokenizer

    from multiplex_trl.markers import automaton_state

    tokenizer = byte_level_tokenizer()
    seen, generate = [], trainer_module.multiplex_generate

    def recording(*args, **kwargs):
        seen.append(kwargs["thinking_end_automaton"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "multiplex_generate", recording)
    tr = _trainer(tokenizer, tiny_model(tokenizer), _args(tmp_path, thinking_end="Answer:"))
    tr._generate_and_score_completions([{"prompt": [{"role": "user", "content": "x"}]}] * 4)
    (table,) = seen
    for text, closes in [("x Answer: 7", 3), ("x\nAnswer:", 4), ("**Answer:** 7", 3), ("Answer x:", None)]:
        stream = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in stream
        assert automaton_state(table.tolist(), stream)[1] == closes, text


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_every_trl_loss_type_trains(tmp_path, tok, loss_type):
    model = tiny_model(tok)
    before = _params(model)
    tr = _trainer(tok, model, _args(tmp_path, loss_type=loss_type))
    tr.train()
    assert torch.isfinite(torch.tensor(tr.state.log_history[0]["loss"]))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def distinct_chars(completions, **kwargs):
    return [float(len(set(c[0]["content"]))) for c in completions]


def test_iterations_accumulation_sequence_level_and_reward_weights(tmp_path, tok):
    """num_iterations > 1 and misaligned accumulation make TRL compute old-policy log-probs through our pass: they are
    the rollout's own log-probs of its slots, scored in chunks of per_device_train_batch_size rows (also after
    optimizer steps), and the advantages weight the two rewards by reward_weights."""
    calls, scored = [], []
    args = _args(
        tmp_path,
        num_iterations=2,
        gradient_accumulation_steps=3,
        max_steps=3,  # 9 micro-steps: a generation every steps_per_generation (3) * num_iterations (2), at 0 and 6
        importance_sampling_level="sequence",
        reward_weights=[1.0, 0.5],
        scale_rewards="batch",
        per_device_train_batch_size=2,
        num_generations=6,
        generation_batch_size=6,
    )
    tr = _trainer(tok, tiny_model(tok), args, reward_funcs=[length_reward, distinct_chars])
    real_logps, real_generate, real_score = (
        tr._get_per_token_logps_and_entropies,
        tr._multiplex_generate,
        tr._generate_and_score_completions,
    )

    def logps(model, input_ids, *a, **kw):
        calls.append((tr._active_slots is not None, input_ids.size(0), kw.get("batch_size")))
        return real_logps(model, input_ids, *a, **kw)

    def generate(*a, **kw):
        scored.append([real_generate(*a, **kw)])
        return scored[-1][0]

    def score(inputs):
        batch = real_score(inputs)
        scored[-1].append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        return batch

    tr._get_per_token_logps_and_entropies, tr._multiplex_generate = logps, generate
    tr._generate_and_score_completions = score
    tr.train()
    assert calls and all(routed for routed, _, _ in calls)  # every log-prob call was routed to the multiplex slots
    assert (6, 2) in [(rows, size) for _, rows, size in calls]  # old-policy passes over 6 rows, 2 at a time
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in tr.state.log_history if "loss" in h)
    assert len(scored) == 2  # the second generation comes after two optimizer steps
    for rollout, batch in scored:
        mask = batch["completion_mask"].bool()
        assert torch.equal(batch["completion_ids"][mask], rollout.completion_ids[mask])
        assert (batch["old_per_token_logps"] - rollout.logprobs)[mask].abs().max().item() < 1e-5
        texts = [
            [{"content": tok.decode(row[m], skip_special_tokens=True)}]
            for row, m in zip(batch["completion_ids"], mask)
        ]
        per_func = torch.tensor([length_reward(texts), distinct_chars(texts)]).T  # [6, 2]
        rewards = per_func @ torch.tensor([1.0, 0.5])  # one group of 6 rows: its std is the batch's
        unweighted = per_func.sum(-1)
        expected = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        torch.testing.assert_close(batch["advantages"], expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected, (unweighted - unweighted.mean()) / (unweighted.std() + 1e-4), atol=1e-3)


def test_kl_with_reference_model(tmp_path, tok, tiny_model_dir):
    tr = MultiplexGRPOTrainer(
        model=tiny_model_dir,
        reward_funcs=length_reward,
        args=_args(tmp_path, beta=0.1),
        train_dataset=_dataset(),
        processing_class=tok,
    )
    assert tr.ref_model is not None
    tr.train()
    kl = tr.state.log_history[0]["kl"]
    # the reference equals the policy at step 0, so the first KL is ~0, computed from the same slots
    assert kl == pytest.approx(0.0, abs=1e-6)


def test_peft_lora_gets_gradients_through_merged_embeddings(tmp_path, tok):
    from peft import LoraConfig

    model = tiny_model(tok)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], lora_dropout=0.0)
    tr = _trainer(tok, model, _args(tmp_path, beta=0.1), peft_config=peft_config)
    lora = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora" in n}
    assert any("lora_embedding" in n for n in lora)
    tr.train()
    changed = {n for n, p in tr.model.named_parameters() if "lora" in n and not torch.equal(lora[n], p)}
    assert any("lora_embedding" in n for n in changed), changed
    assert any("q_proj" in n for n in changed)
    assert "kl" in tr.state.log_history[0]  # reference = adapters disabled


def test_generation_is_unwrapped_no_grad_and_rewards_see_slot0_text(tmp_path, tok, monkeypatch):
    seen, entered = [], []
    real_unwrap, real_generate = trainer_module.unwrap_model_for_generation, trainer_module.multiplex_generate

    def unwrap(*a, **kw):
        entered.append(True)
        return real_unwrap(*a, **kw)

    def generate(*a, **kw):
        assert not torch.is_grad_enabled()
        return real_generate(*a, **kw)

    monkeypatch.setattr(trainer_module, "unwrap_model_for_generation", unwrap)
    monkeypatch.setattr(trainer_module, "multiplex_generate", generate)

    def recording_reward(completions, **kwargs):
        seen.extend(c[0]["content"] for c in completions)
        return [0.0] * len(completions)

    tr = _trainer(tok, tiny_model(tok), _args(tmp_path), reward_funcs=recording_reward)
    batch = tr._generate_and_score_completions([{"prompt": p} for p in _dataset(4)["prompt"]])
    assert entered
    ids, mask = batch["completion_ids"], batch["completion_mask"].bool()
    slot0 = batch["multiplex_ids"][..., 0]
    assert torch.equal(ids[mask], slot0[mask])
    decoded = [tok.decode(row[m], skip_special_tokens=True) for row, m in zip(ids, mask)]
    assert seen == decoded
    assert batch["multiplex_ids"].shape[:2] == ids.shape and batch["thinking_mask"].any()


def test_forced_marker_tokens_get_no_loss(tmp_path):
    tok = tiny_tokenizer(with_think_token=False)
    args = _args(tmp_path, max_thinking_tokens=3, max_completion_length=16)
    tr = _trainer(tok, tiny_model(tok), args)
    batch = tr._generate_and_score_completions([{"prompt": p} for p in _dataset(4)["prompt"]])
    marker = tok.encode("</think>", add_special_tokens=False)
    assert "tool_mask" in batch
    forced = (batch["tool_mask"] == 0) & batch["completion_mask"].bool()
    assert forced.any()
    for row in range(4):
        if forced[row].any():  # rows that did not end or close naturally within the budget
            assert batch["completion_ids"][row][forced[row]].tolist() == marker
            assert batch["thinking_mask"][row].sum() == 3


@pytest.mark.parametrize(
    "fp32_head,moe,loss",
    [(False, False, {}), (True, False, {}), (False, True, {})]
    + [(False, False, {"loss_type": name}) for name in TRL_LOSS_TYPES if name != "grpo"]
    + [(False, False, {"importance_sampling_level": "sequence"})],
    ids=["fp32", "bf16-weights-fp32-head", "moe", *(n for n in TRL_LOSS_TYPES if n != "grpo"), "sequence-level"],
)
def test_width_one_reproduces_trl_loss(tmp_path, tok, tiny_model_dir, fp32_head, moe, loss):
    """Same tokens -> the same log-probs and the same loss as TRL's GRPOTrainer, for K=1, under every TRL loss type
    and sequence-level importance sampling. With bf16 weights and `cast_lm_head_to_fp32`, both score with the float32
    head (ours ignored the option: log-probs 1e-2 apart). An MoE model adds the router load-balancing loss at its
    config's coefficient, as TRL does (ours refused MoE models)."""
    if moe:
        model = tiny_moe_model(tok)
    else:
        dtype = torch.bfloat16 if fp32_head else torch.float32
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    common = {
        "cast_lm_head_to_fp32": fp32_head,
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 20,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "beta": 0.0,
        "temperature": 0.9,
        "loss_type": "grpo",
        **loss,
    }
    ours = MultiplexGRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=length_reward,
        args=MultiplexGRPOConfig(multiplex_width=1, **common),
        train_dataset=_dataset(),
        processing_class=tok,
    )
    theirs = GRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=length_reward,
        args=GRPOConfig(**common),
        train_dataset=_dataset(),
        processing_class=tok,
    )
    # same-length prompts: no left padding, so both passes number positions identically
    prompts = [[{"role": "user", "content": f"{i}+{i}?"}] for i in range(4)]
    batch = ours._generate_and_score_completions([{"prompt": p} for p in prompts])
    assert (batch["multiplex_weights"][..., 0][batch["completion_mask"].bool()] == 1).all()
    trl_batch = {k: v for k, v in batch.items() if not k.startswith("multiplex") and k != "thinking_mask"}
    for tr in (ours, theirs):
        tr.model.train()
        tr.current_gradient_accumulation_steps = 1
    loss_ours = ours._compute_loss(ours.model, batch)
    loss_theirs = theirs._compute_loss(theirs.model, trl_batch)
    assert abs(loss_ours.item() - loss_theirs.item()) < 1e-6
    assert ours.aux_loss_enabled == theirs.aux_loss_enabled == moe
    if moe:  # the aux loss is in both losses (logged as TRL logs it)
        aux = ours._metrics["train"]["aux_loss"]
        assert aux and aux == pytest.approx(theirs._metrics["train"]["aux_loss"], abs=1e-6) and aux[0] > 0
    loss_ours.backward()
    loss_theirs.backward()
    for (n, p), (_, q) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        tol = {"atol": 1e-6, "rtol": 1e-5}
        if p.dtype == torch.bfloat16:  # the embedding gradient sums its rows in bf16, in another order than TRL's
            tol = {"atol": 2**-8 * q.grad.abs().max().item(), "rtol": 1.6e-2}  # one bf16 step at the largest entry
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=n)


def test_vllm_with_width_one_falls_through_to_trl(tmp_path, tok):
    args = _args(
        tmp_path, multiplex_width=1, use_vllm=True, max_thinking_tokens=None
    )  # no budget: no multiplex rollout
    with pytest.raises(ImportError, match="vLLM"):  # TRL's own vLLM path, which needs vllm installed
        _trainer(tok, tiny_model(tok), args)


def test_overridden_trl_hooks_keep_their_signatures():
    for name, params in trainer_module.OVERRIDDEN_HOOKS.items():
        hook = getattr(GRPOTrainer, name, None)
        assert hook is not None, f"trl.GRPOTrainer.{name} no longer exists"
        actual = list(inspect.signature(hook).parameters)
        assert actual[: len(params)] == params, (name, actual)
    src = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert "self._get_per_token_logps_and_entropies(" in src and "self._generate(" in src
    assert "self._generate_single_turn(" in inspect.getsource(GRPOTrainer._generate)
    assert "tool_mask" in inspect.getsource(GRPOTrainer._compute_loss)
    # multiplex_trl.logprobs.SlotLogProbs runs TRL's chunked kernel's forward and backward on its own ctx
    from trl.kernels import ChunkedLogProbFunction

    forward = list(inspect.signature(ChunkedLogProbFunction.forward).parameters)
    assert forward[:10] == [
        "ctx",
        "hidden",
        "weight",
        "bias",
        "targets",
        "temperature",
        "chunk_size",
        "final_logit_softcapping",
        "logit_scale",
        "outputs",
    ]
    assert list(inspect.signature(ChunkedLogProbFunction.backward).parameters)[:3] == [
        "ctx",
        "grad_logprobs",
        "grad_entropy",
    ]


def test_static_cache_trains_in_bf16_mixed_precision(tmp_path, tok):
    """bf16=True with float32 weights: accelerate runs the forward under autocast, generation included; the static
    cache decodes there (it failed on its first rollout before keys and values were stored in one dtype)."""
    tr = _trainer(tok, tiny_model(tok), _args(tmp_path, bf16=True, cache_implementation="static", max_steps=2))
    tr.train()
    logs = tr.state.log_history[0]
    assert torch.isfinite(torch.tensor(logs["loss"])) and logs["multiplex/thinking_length"] > 0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_static_cache_and_compiled_decode_train(tmp_path, tok, monkeypatch, lora):
    """cache_implementation='static' + multiplex_compile reach the rollout; its log-probs are exact before and after
    optimizer steps (the compiled step reads the updated weights, LoRA adapters included); the run trains."""
    from conftest import chat_batch, recompute
    from torch._dynamo.utils import counters

    import multiplex_trl.rollout as rollout_module

    compiled_for = []
    real = rollout_module.compiled_decode_step
    monkeypatch.setattr(rollout_module, "compiled_decode_step", lambda m: compiled_for.append(m) or real(m))
    kwargs = {}
    if lora:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    args = _args(tmp_path, cache_implementation="static", multiplex_compile=True, max_steps=3)
    tr = _trainer(tok, tiny_model(tok), args, **kwargs)
    model = tr.accelerator.unwrap_model(tr.model)  # what the trainer generates with (the PeftModel with LoRA)
    before = _params(model)
    input_ids, mask = chat_batch(tok, ["1+1?", "what is two plus two?", "x", "a longer prompt"])

    def exact_rollout():
        rollout = tr._multiplex_generate(model.eval(), input_ids, mask)
        assert (recompute(model, input_ids, mask, rollout) - rollout.logprobs).abs().max().item() < 1e-5

    class CountGraphs(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            graphs.append(counters["stats"]["unique_graphs"])

    graphs = []
    tr.add_callback(CountGraphs())
    exact_rollout()
    assert compiled_for == [model]
    tr.train()
    assert len(compiled_for) > 1 and all(m is model for m in compiled_for)
    assert "multiplex/branch_rate" in tr.state.log_history[0]
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    # train() turns gradient checkpointing on (one recompile, in the first step); after that the optimizer steps and
    # LoRA adapters never make the decode step compile again
    assert len(graphs) == 3 and graphs[0] == graphs[-1], graphs
    exact_rollout()  # after the optimizer steps, with the step compiled before them


def test_repeated_input_grad_hooks_are_dropped_and_the_newest_kept(tok):
    """transformers' enable_input_require_grads adds one more identical hook per call; the clean-up keeps the newest
    (the one transformers holds a handle to, so disable_input_require_grads still removes it) and nothing else."""
    model = tiny_model(tok)
    embed = model.get_input_embeddings()
    other = embed.register_forward_hook(lambda module, args, output: None)
    for _ in range(4):
        model.enable_input_require_grads()
    assert len(embed._forward_hooks) == 5
    assert trainer_module.drop_repeated_input_grad_hooks(model) == 3
    assert list(embed._forward_hooks) == [other.id, model._require_grads_hooks[0].id]
    with torch.no_grad():
        assert embed(torch.tensor([[3]])).requires_grad  # the kept hook still works
    model.disable_input_require_grads()
    assert list(embed._forward_hooks) == [other.id]
    assert trainer_module.drop_repeated_input_grad_hooks(model) == 0


def test_input_grad_hooks_do_not_pile_up_over_training_steps(tmp_path, tok):
    """TRL turns gradient checkpointing off and on around each generation and scoring pass and transformers adds a
    hook each time (TRL's GRPOTrainer: 3, 5, 7, ... hooks on the embeddings, all run at every decode step). The
    multiplex trainer keeps one, and training still updates the weights through checkpointed layers."""
    model = tiny_model(tok)
    before = _params(model)
    tr = _trainer(tok, model, _args(tmp_path, max_steps=4, gradient_checkpointing=True))
    counts = []

    class CountHooks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            counts.append(len(model.get_input_embeddings()._forward_hooks))

    tr.add_callback(CountHooks())
    tr.train()
    assert counts == [1, 1, 1, 1]
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_moe_whose_aux_loss_is_not_reproduced_is_refused(tmp_path, tok, monkeypatch):
    """An MoE architecture that computes its load-balancing loss some other way is refused at construction (the loss
    would silently lack it), naming the way out; router_aux_loss_coef=0 trains it."""
    monkeypatch.setattr(trainer_module, "router_aux_loss_function", lambda model: None)
    with pytest.raises(ValueError, match="the MoE router aux loss of Qwen3MoeForCausalLM .* router_aux_loss_coef=0"):
        _trainer(tok, tiny_moe_model(tok), _args(tmp_path))
    assert not _trainer(tok, tiny_moe_model(tok), _args(tmp_path, router_aux_loss_coef=0.0)).aux_loss_enabled


async def async_flaky_reward(prompts, completions, **kwargs):
    """An async reward (TRL awaits it on its event loop) that fails on the prompt '2+2?' (sample 2 of the batch)."""
    return [1 / 0 if "2+2" in p[-1]["content"] else 1.0 for p in prompts]


@pytest.mark.parametrize("policy", ["raise", "none"])
def test_reward_error_applies_to_async_reward_functions(tmp_path, tok, policy):
    """reward_error covers async reward functions too: 'none' scores the failing sample None (zero advantage) and
    'raise' names the function and the sample (async functions bypassed the guard: the run died on the bare
    ZeroDivisionError whatever reward_error said)."""
    tr = _trainer(tok, tiny_model(tok), _args(tmp_path, reward_error=policy), reward_funcs=[async_flaky_reward])
    inputs = [{"prompt": p} for p in _dataset(4)["prompt"]]
    if policy == "raise":
        with pytest.raises(RuntimeError, match=r"'async_flaky_reward' raised on sample 2 .*ZeroDivisionError"):
            tr._generate_and_score_completions(inputs)
        return
    batch = tr._generate_and_score_completions(inputs)
    assert batch["advantages"][2] == 0.0
    logged = list(tr._logs["rewards"]["async_flaky_reward"])
    assert math.isnan(logged[2]) and logged[:2] + logged[3:] == [1.0] * 3  # NaN for the failing sample only


def test_unbounded_completion_length_is_refused_before_the_model_loads(tmp_path):
    """max_completion_length=None (TRL accepts it) left the rollout without a bound: the first rollout died on a
    TypeError (int + None) after the model had loaded. It is refused in one line naming the field."""
    with pytest.raises(ValueError, match="max_completion_length=None .* set it to an integer >= 1"):
        _args(tmp_path, max_completion_length=None, max_thinking_tokens=None)
