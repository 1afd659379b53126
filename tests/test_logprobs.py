import pytest
import torch
from conftest import chat_batch, recompute
from torch.utils._python_dispatch import TorchDispatchMode

from multiplex_trl.logprobs import multiplex_logprobs
from multiplex_trl.rollout import multiplex_generate
from multiplex_trl.testing import tiny_model


PROMPTS = ["1+1?", "two plus two", "x", "a longer prompt"]


def _rollout(model, tok, width=3, n=4, max_new_tokens=24, prompts=PROMPTS, **kw):
    input_ids, mask = chat_batch(tok, prompts[:n])
    r = multiplex_generate(
        model,
        input_ids,
        mask,
        width=width,
        max_new_tokens=max_new_tokens,
        thinking_end_ids=[4],
        eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(0),
        max_thinking_tokens=10,
        **kw,
    )
    return r, input_ids, mask


def test_factorised_logprob_sums_every_slot_at_thinking_positions(tok, model):
    r, input_ids, mask = _rollout(model, tok)
    lp = recompute(model, input_ids, mask, r, temperature=1.0)
    # Brute force: full logits from an inputs_embeds forward, log_softmax, sum the counted slots.
    emb = model.get_input_embeddings()
    completion = (emb(r.ids) * r.weights.unsqueeze(-1)).sum(-2)
    full_mask = torch.cat([mask, r.completion_mask.long()], 1)
    embeds = torch.cat([emb(input_ids), completion], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(inputs_embeds=embeds, attention_mask=full_mask, position_ids=pos).logits
    logp = logits[:, input_ids.size(1) - 1 : -1].log_softmax(-1)
    per_slot = logp.gather(-1, r.ids)  # [B, T, K]
    expected = torch.where(r.thinking_mask, per_slot.sum(-1), per_slot[..., 0]) * r.completion_mask
    torch.testing.assert_close(lp, expected, atol=1e-5, rtol=1e-5)
    assert r.thinking_mask.any() and (r.ids[..., 1:] != r.ids[..., :1]).any()


def test_gradients_reach_every_slot_embedding_row(tok, model):
    r, input_ids, mask = _rollout(model, tok)
    model.zero_grad()
    lp = recompute(model, input_ids, mask, r, temperature=1.0)
    lp.sum().backward()
    grad = model.get_input_embeddings().weight.grad
    used = r.ids[r.thinking_mask][r.weights[r.thinking_mask] > 0].unique()
    used = used[used != tok.pad_token_id]  # nn.Embedding(padding_idx=pad) never gets a gradient
    assert (grad[used].abs().sum(-1) > 0).all()
    assert model.lm_head.weight.grad[r.ids[r.thinking_mask].unique()].abs().sum() > 0


class _LargestLogits(TorchDispatchMode):
    """Records the largest float32 tensor with a vocabulary-sized last dim (a logits tile) any op produces."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() and t.size(-1) == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


def _trl_trainer(tok, tiny_model_dir, temperature=1.0):
    """TRL's own GRPOTrainer on the tiny model: its `_get_per_token_logps_and_entropies` is the reference."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir="/tmp/unused",
        use_cpu=True,
        bf16=False,
        report_to="none",
        beta=0.0,
        per_device_train_batch_size=4,
        num_generations=4,
        temperature=temperature,
    )
    return GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a"] * 4}),
        processing_class=tok,
    )


def test_logprob_pass_never_builds_logits_larger_than_trls(tok, tiny_model_dir):
    """No [B, T, K, V] (nor [B, T, V]) tensor: the largest float tensor is the same as TRL's chunked path."""
    trl_trainer = _trl_trainer(tok, tiny_model_dir)
    model = trl_trainer.model
    r, input_ids, mask = _rollout(model, tok, width=3, max_new_tokens=40)
    full_ids = torch.cat([input_ids, r.completion_ids], 1)
    full_mask = torch.cat([mask, r.completion_mask.long()], 1)
    with _LargestLogits(len(tok)) as trl_mode:
        trl_trainer._get_per_token_logps_and_entropies(model, full_ids, full_mask, r.ids.size(1), compute_entropy=True)
    with _LargestLogits(len(tok)) as ours:
        recompute(model, input_ids, mask, r, temperature=1.0, compute_entropy=True)
    vocab = len(tok)
    bt = r.ids.size(0) * r.ids.size(1)
    assert 0 < ours.largest <= trl_mode.largest, (ours.largest, trl_mode.largest)
    assert ours.largest < bt * r.ids.size(-1) * vocab  # no [B, T, K, V] tensor


@pytest.mark.parametrize("left_padded", [False, True])
def test_width_one_logprobs_equal_trl(tok, tiny_model_dir, left_padded):
    """K=1 scores the same tokens as TRL's own pass (same kernel, same hidden states).

    With left padding TRL's pass numbers positions from the first pad while ours (like generation) from the first
    real token; RoPE makes the two mathematically equal, and they differ only by float rounding of the angles.
    """
    trl_trainer = _trl_trainer(tok, tiny_model_dir, temperature=0.8)
    model = trl_trainer.model
    prompts = PROMPTS if left_padded else ["1+1?", "2+2?", "3+3?", "4+4?"]
    r, input_ids, mask = _rollout(model, tok, width=1, temperature=0.8, max_new_tokens=30, prompts=prompts)
    assert bool((mask == 0).any()) == left_padded
    full_ids = torch.cat([input_ids, r.completion_ids], 1)
    full_mask = torch.cat([mask, r.completion_mask.long()], 1)
    theirs, their_ent, _ = trl_trainer._get_per_token_logps_and_entropies(
        model, full_ids, full_mask, r.ids.size(1), compute_entropy=True
    )
    ours, our_ent = recompute(model, input_ids, mask, r, temperature=0.8, compute_entropy=True)
    m = r.completion_mask
    tol = 1e-5 if left_padded else 1e-6
    assert (ours[m] - theirs[m]).abs().max().item() < tol
    assert (our_ent[m] - their_ent[m]).abs().max().item() < tol


@pytest.mark.parametrize("mixer", ["multiplex", "mot_distinct"])
def test_gradients_equal_brute_force_autograd(tok, model, mixer):
    """d/dtheta of the factorised log-prob equals autograd through full logits (every parameter, lm_head included)."""
    r, input_ids, mask = _rollout(model, tok, mixer=mixer)
    weights = r.weights.clone()
    model.zero_grad()
    ours = multiplex_logprobs(
        model,
        input_ids,
        mask,
        r.ids,
        weights,
        r.completion_mask,
        temperature=0.7,
        thinking_mask=r.thinking_mask,
        mixer=mixer,
    )
    (ours * torch.linspace(0.5, 1.5, ours.numel()).view_as(ours)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    emb = model.get_input_embeddings()
    completion = (emb(r.ids) * weights.unsqueeze(-1)).sum(-2)
    full_mask = torch.cat([mask, r.completion_mask.long()], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        inputs_embeds=torch.cat([emb(input_ids), completion], 1), attention_mask=full_mask, position_ids=pos
    ).logits
    per_slot = (logits[:, input_ids.size(1) - 1 : -1] / 0.7).log_softmax(-1).gather(-1, r.ids)  # [B, T, K]
    coef = weights if mixer == "mot_distinct" else torch.ones_like(weights)
    brute = torch.where(r.thinking_mask, (coef * per_slot).sum(-1), per_slot[..., 0]) * r.completion_mask
    torch.testing.assert_close(ours, brute, atol=1e-5, rtol=1e-5)
    (brute * torch.linspace(0.5, 1.5, brute.numel()).view_as(brute)).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_a_deep_copy_of_a_patched_model_runs_its_own_weights(tok, model):
    """The multiplex head patches `model.forward`; a deep copy (e.g. a reference policy) must not call back into the
    original's weights, neither when generating (plain forward) nor when scoring slots."""
    import copy

    from multiplex_trl.logprobs import add_multiplex_head

    add_multiplex_head(model)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(-1.0)
    x = torch.randint(10, 60, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=x).logits, -model(input_ids=x).logits)
        r, input_ids, mask = _rollout(other, tok)
        assert (recompute(other, input_ids, mask, r) - r.logprobs).abs().max().item() < 1e-5


def _stored_slots(tok, n, length=8, width=3, seed=0):
    """Random stored completions for `n` chat prompts, different in every row: ids, weights [n, T, K], thinking
    for the first few positions (K slots), then answer positions (slot 0, one-hot weight), then padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids, mask = chat_batch(tok, [("abcdefgh" * 2)[: 1 + 3 * i] for i in range(n)])
    ids = torch.randint(7, len(tok), (n, length, width), generator=g)
    weights = torch.randn(n, length, width, generator=g).softmax(-1)
    steps = torch.arange(length)
    thinking_mask = steps < torch.arange(2, 2 + n).clamp(max=length - 2).unsqueeze(-1)  # [n, T]
    completion_mask = (steps < length - torch.arange(n).remainder(3).unsqueeze(-1)).long()  # [n, T]
    weights = torch.where(thinking_mask.unsqueeze(-1), weights, torch.eye(width)[0])
    return input_ids, mask, ids, weights, completion_mask, thinking_mask


def _brute_force(model, input_ids, mask, ids, weights, completion_mask, thinking_mask, temperature):
    """[B, T] from the model's own full logits (its scale, softcap and bias included): log_softmax(logits / T) at
    every slot of a thinking position, summed, and at slot 0 of an answer position."""
    emb = model.get_input_embeddings()
    completion = (emb(ids) * weights.unsqueeze(-1)).sum(-2)
    full_mask = torch.cat([mask, completion_mask.long()], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        inputs_embeds=torch.cat([emb(input_ids), completion], 1), attention_mask=full_mask, position_ids=pos
    ).logits
    per_slot = (logits[:, input_ids.size(1) - 1 : -1] / temperature).log_softmax(-1).gather(-1, ids)  # [B, T, K]
    return torch.where(thinking_mask, per_slot.sum(-1), per_slot[..., 0]) * completion_mask


def _tiny_head_model(tok, head):
    """A tiny causal LM whose LM head does more than h . W: Gemma-2's final-logit softcap, Cohere's logit scale,
    Granite's logit divisor, or a bias (the tiny Llama with lm_head replaced by a biased nn.Linear)."""
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
    )

    torch.manual_seed(0)
    common = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": None,
        "tie_word_embeddings": False,
        "attn_implementation": "eager",
    }
    if head == "bias":
        model = tiny_model(tok)
        biased = torch.nn.Linear(32, len(tok), bias=True)
        with torch.no_grad():
            biased.weight.copy_(model.lm_head.weight)
            biased.bias.normal_(0.0, 2.0)
        model.lm_head = biased
        return model.eval()
    if head == "softcap":  # logits = 3 tanh(logits / 3): well inside the curved part of tanh at these logits
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0))
    elif head == "logit_scale":  # logits * 2.5
        model = CohereForCausalLM(CohereConfig(**common, logit_scale=2.5))
    else:  # logits / 4
        model = GraniteForCausalLM(GraniteConfig(**common, logits_scaling=4.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()


@pytest.mark.parametrize("head", ["softcap", "logit_scale", "logits_scaling", "bias"])
def test_logit_transforms_and_lm_head_bias_equal_brute_force(tok, head):
    """Log-probs and gradients through a soft-capped, scaled or biased LM head equal autograd through the model's own
    full logits (the parameter gradients cover d/dhidden, d/dW and d/dbias)."""
    model = _tiny_head_model(tok, head)
    input_ids, mask, ids, weights, completion_mask, thinking_mask = _stored_slots(tok, 3)
    ours = multiplex_logprobs(
        model, input_ids, mask, ids, weights, completion_mask, temperature=0.7, thinking_mask=thinking_mask
    )
    upstream = torch.linspace(0.5, 1.5, ours.numel()).view_as(ours)
    (ours * upstream).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    brute = _brute_force(model, input_ids, mask, ids, weights, completion_mask, thinking_mask, temperature=0.7)
    torch.testing.assert_close(ours, brute, atol=1e-5, rtol=1e-5)
    (brute * upstream).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    assert thinking_mask.any() and (~thinking_mask & completion_mask.bool()).any()


def test_chunked_batch_equals_one_pass(tok, model):
    """batch_size=2 over 6 rows (TRL's chunked old-policy pass) gives the same log-probs and entropies as one pass:
    each chunk scores its own rows' prompts, slots, weights and masks."""
    input_ids, mask, ids, weights, completion_mask, thinking_mask = _stored_slots(tok, 6)
    with torch.no_grad():
        whole = multiplex_logprobs(
            model, input_ids, mask, ids, weights, completion_mask, temperature=0.7, thinking_mask=thinking_mask,
            compute_entropy=True,
        )  # fmt: skip
        chunked = multiplex_logprobs(
            model, input_ids, mask, ids, weights, completion_mask, temperature=0.7, thinking_mask=thinking_mask,
            compute_entropy=True, batch_size=2,
        )  # fmt: skip
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "gpt_oss"])
def test_moe_router_aux_loss_is_the_models_own(tok, family):
    """The multiplex pass returns the MoE load-balancing loss the model's own forward computes from the same
    positions (one-hot slots: the same router inputs as the token ids), averaged over chunks as TRL does; at K=3 it
    comes from the merged embeddings and reaches the router weights in backward."""
    from multiplex_trl.logprobs import router_aux_loss_function
    from multiplex_trl.testing import tiny_moe_model

    model = tiny_moe_model(tok, family).eval()
    assert router_aux_loss_function(model) is not None and router_aux_loss_function(tiny_model(tok)) is None
    r, input_ids, mask = _rollout(model, tok, width=1)
    full_ids = torch.cat([input_ids, r.completion_ids], 1)
    full_mask = torch.cat([mask, r.completion_mask.long()], 1)
    position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
    expected = [
        model(
            input_ids=full_ids[rows],
            attention_mask=full_mask[rows],
            position_ids=position_ids[rows],
            output_router_logits=True,
        ).aux_loss
        for rows in (slice(0, 2), slice(2, 4))
    ]
    logps, entropies, aux = multiplex_logprobs(
        model,
        input_ids,
        mask,
        r.ids,
        r.weights,
        r.completion_mask,
        temperature=1.0,
        batch_size=2,
        compute_aux_loss=True,
    )
    assert entropies is None and aux.item() > 0
    torch.testing.assert_close(aux, torch.stack(expected).mean(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logps, recompute(model, input_ids, mask, r, temperature=1.0), atol=1e-5, rtol=1e-5)

    r, input_ids, mask = _rollout(model, tok, width=3)
    assert (r.ids[r.thinking_mask][:, 1:] != r.ids[r.thinking_mask][:, :1]).any()  # merged positions do occur
    _, _, aux = multiplex_logprobs(
        model, input_ids, mask, r.ids, r.weights, r.completion_mask, temperature=1.0, thinking_mask=r.thinking_mask,
        compute_aux_loss=True,
    )  # fmt: skip
    aux.backward()
    gates = [p.grad for n, p in model.named_parameters() if n.endswith(("mlp.gate.weight", "mlp.router.weight"))]
    assert gates and all(g is not None and g.abs().sum() > 0 for g in gates)


def test_slot0_targets_reach_the_kernel_as_trls_triton_kernel_reads_them(tok, model, monkeypatch):
    """On CUDA, TRL's Triton kernels load target `row` at `targets_ptr + row`, ignoring strides. The CPU path here
    honours strides, so this emulates the CUDA addressing: the kernel gets the targets re-read at stride 1 from their
    storage. The slot-0 column of the [N, K] slots (stride K) read that way scored other tokens (log-probs 30 apart)."""
    import multiplex_trl.logprobs as logprobs_module

    real = logprobs_module.ChunkedLogProbFunction

    class PointerReads:
        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, *args):
            as_read = targets.as_strided(targets.shape, (1,))  # what `tl.load(targets_ptr + row)` sees
            return real.forward(ctx, hidden, weight, bias, as_read, *args)

        backward = staticmethod(real.backward)

    monkeypatch.setattr(logprobs_module, "ChunkedLogProbFunction", PointerReads)
    r, input_ids, mask = _rollout(model, tok)
    assert (r.ids[..., 1:] != r.ids[..., :1]).any()  # slots differ: a misread column would change the scores
    lp = recompute(model, input_ids, mask, r, temperature=1.0)
    assert (lp - r.logprobs).abs().max().item() < 1e-4


def test_entropy_is_the_policys_at_every_position_not_the_joint_of_the_k_draws(tok, model):
    """The entropy TRL logs (and masks by, top_entropy_quantile) is H(pi) at each completion position, a
    thinking position included: one distribution scores all K draws, so it is not their joint entropy K * H(pi)."""
    input_ids, mask, ids, weights, completion_mask, thinking_mask = _stored_slots(tok, 3)
    with torch.no_grad():
        _, entropy = multiplex_logprobs(
            model, input_ids, mask, ids, weights, completion_mask, temperature=0.7, thinking_mask=thinking_mask,
            compute_entropy=True,
        )  # fmt: skip
        emb = model.get_input_embeddings()
        full_mask = torch.cat([mask, completion_mask.long()], 1)
        logits = model(
            inputs_embeds=torch.cat([emb(input_ids), (emb(ids) * weights.unsqueeze(-1)).sum(-2)], 1),
            attention_mask=full_mask,
            position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0),
        ).logits[:, input_ids.size(1) - 1 : -1]
    logp = (logits / 0.7).log_softmax(-1)
    expected = -(logp.exp() * logp).sum(-1)  # [B, T]
    on = completion_mask.bool()
    assert (thinking_mask & on).any() and (~thinking_mask & on).any() and (expected[on] > 0.1).all()
    torch.testing.assert_close(entropy[on], expected[on], atol=1e-5, rtol=1e-5)


def test_learned_absolute_positions_count_from_the_first_real_token(tok):
    """A model with learned absolute positions (GPT-2) is not invariant to a shift of every position as RoPE is: the
    pass must number a left-padded row's positions as its rollout did (from its first real token), or its stored and
    recomputed log-probs differ (by about 10 here when the pass numbered them from the first pad)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    r, input_ids, mask = _rollout(model, tok, n=2, max_new_tokens=12, prompts=["1+1?", "a longer prompt here"])
    assert (mask == 0).sum() > 5  # the short prompt is left-padded
    with torch.no_grad():
        assert (recompute(model, input_ids, mask, r) - r.logprobs).abs().max().item() < 1e-4
