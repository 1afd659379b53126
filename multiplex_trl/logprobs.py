"""The factorised log-probability of a multiplex trajectory, recomputed by one teacher-forced pass (README: The method in one screen).

    log pi(c) = sum_i sum_j log pi(k_ij | ctx_<i)   (thinking positions, all K slots)
              + sum_i log pi(y_i | ctx_<i)         (answer positions, slot 0)

The pass runs *inside* the model's forward (like TRL's fused LM head), so DDP, DeepSpeed and PEFT wrappers see an
ordinary forward call. Slot 0 goes through TRL's chunked log-prob kernel (the same numbers TRL computes for discrete
tokens, never the full [N, V] logits); the other slots reuse its log-normaliser: log p(k_j) = log p(k_0) + z_j - z_0,
where z_j = h . W[k_j] is one dot product per slot, so K costs no extra vocabulary projection.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .mixers import Mixer, get_mixer
from .sampling import merge_slot_embeddings


_VOCAB_CHUNK = 32768  # TRL's _CHUNKED_LOGPROB_CHUNK_SIZE: the widest float32 logits tile ever materialised


@dataclass
class MultiplexLogProbs(ModelOutput):
    log_probs: torch.Tensor | None = None  # [B, T] per-position factorised log-prob, 0 off the completion
    entropy: torch.Tensor | None = None  # [B, T] entropy of pi at each position
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss of this forward's router logits, when asked


def router_aux_loss_function(model):
    """The MoE load-balancing loss of `model` as its own forward computes it from its base model's router logits:
    `fn(router_logits, attention_mask)`, or None where the architecture computes it some other way.

    transformers' MoE causal LMs call their module's `load_balancing_loss_func(router_logits, num_experts,
    num_experts_per_tok, attention_mask)`; tests/test_logprobs.py checks the result against the model's own aux_loss.
    """
    func = _load_balancing_loss_func(type(model))
    experts, top_k = getattr(model, "num_experts", None), getattr(model, "num_experts_per_tok", None)
    if func is None or not isinstance(experts, int) or not isinstance(top_k, int):
        return None
    return lambda router_logits, attention_mask: func(router_logits, experts, top_k, attention_mask)


@functools.cache
def _load_balancing_loss_func(cls):
    """The module's `load_balancing_loss_func` where `cls.forward` calls it with the common arguments, else None."""
    func = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
    if func is None:
        return None
    source = " ".join(inspect.getsource(cls.forward).split()).replace("( ", "(")
    call = "load_balancing_loss_func(outputs.router_logits, self.num_experts, self.num_experts_per_tok, attention_mask"
    return func if call in source else None


def _logit_transform(config) -> tuple[float, float | None]:
    """(logit_scale, final_logit_softcapping) as TRL's fused head reads them from the text config."""
    text = config.get_text_config()
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1 / text.logits_scaling
    return (1.0 if scale is None else scale), softcap


def unwrap_model(model):
    """The transformers model under DDP / DeepSpeed / PEFT wrappers (the one whose forward we extend)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def add_multiplex_head(model) -> None:
    """Extend `model.forward` so `model(..., multiplex_ids=..., ...)` returns `MultiplexLogProbs` instead of logits.

    Idempotent. Without `multiplex_ids` the forward is unchanged (generation, TRL's fused head).
    """
    if getattr(model, "_multiplex_head", False):
        return
    inner_forward = model.forward
    # Call the inner forward through its function with *this* `self`: a deep copy of the model (a reference policy)
    # then runs its own weights, not the original's (a bound method captured here would stay bound to the original).
    inner_func = inner_forward.__func__ if getattr(inner_forward, "__self__", None) is model else None
    scale, softcap = _logit_transform(model.config)

    def forward(
        self,
        *args,
        multiplex_ids=None,  # [B, T, K] completion slots
        multiplex_weights=None,  # [B, T, K]
        multiplex_slot_coefs=None,  # [B, T, K] weight of each slot's log-prob
        multiplex_completion_mask=None,  # [B, T]
        multiplex_temperature=1.0,
        multiplex_entropy=False,
        multiplex_fp32_head=False,
        multiplex_aux_loss=False,
        **kwargs,
    ):
        if multiplex_ids is None:
            return inner_func(self, *args, **kwargs) if inner_func is not None else inner_forward(*args, **kwargs)
        input_ids, attention_mask = kwargs.pop("input_ids"), kwargs.pop("attention_mask")  # prompt [B, P]
        position_ids = kwargs.pop("position_ids")  # [B, P + T]
        # Wrappers (PEFT) pass their unused arguments on as None (inputs_embeds, labels, ...): drop them.
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        # One embedding lookup for prompt and slots (one dense embedding gradient in backward, as TRL's pass).
        batch, prompt_len = input_ids.shape
        flat = self.get_input_embeddings()(torch.cat([input_ids.reshape(-1), multiplex_ids.reshape(-1)]))
        slot_embeds = flat[batch * prompt_len :].view(*multiplex_ids.shape, -1)  # [B, T, K, H]
        merged = merge_slot_embeddings(slot_embeds, multiplex_weights)
        inputs_embeds = torch.cat([flat[: batch * prompt_len].view(batch, prompt_len, -1), merged], dim=1)
        full_mask = torch.cat([attention_mask, multiplex_completion_mask.to(attention_mask.dtype)], dim=1)
        if multiplex_aux_loss:
            kwargs["output_router_logits"] = True
        out = self.base_model(
            inputs_embeds=inputs_embeds, attention_mask=full_mask, position_ids=position_ids, use_cache=False, **kwargs
        )
        length = multiplex_ids.size(1)
        hidden = out.last_hidden_state[:, prompt_len - 1 : prompt_len - 1 + length]  # [B, T, H] predicts each slot
        scored = _score_slots(
            self.get_output_embeddings(),
            hidden,
            multiplex_ids,
            multiplex_slot_coefs,
            multiplex_completion_mask.bool(),
            temperature=multiplex_temperature,
            scale=scale,
            softcap=softcap,
            entropy=multiplex_entropy,
            fp32_head=multiplex_fp32_head,
        )
        if multiplex_aux_loss:
            scored.aux_loss = router_aux_loss_function(self)(out.router_logits, full_mask)
        return scored

    model.forward = types.MethodType(forward, model)
    model._multiplex_head = True


class SlotLogProbs(torch.autograd.Function):
    """Per row sum_j c_j log p(k_j) = (sum_j c_j) log p(k_0) + sum_{j>0} c_j (z_j - z_0), and the entropy.

    Slot 0 runs through TRL's chunked kernel (its forward and backward, on this function's ctx). The other slots'
    logits z_j = h . W[k_j] are K dot products; their gradient is added into the kernel's own gradient buffers in
    backward, so K > 1 allocates no second [V, H] weight gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, slots, coefs, temperature, scale, softcap, outputs):
        # contiguous: TRL's Triton kernels (CUDA) read target `row` at targets_ptr + row, ignoring strides; the
        # slot-0 column of [N, K] has stride K
        logp0, ent, *_ = ChunkedLogProbFunction.forward(
            ctx, hidden, weight, bias, slots[:, 0].contiguous(), temperature, _VOCAB_CHUNK, softcap, scale, outputs
        )
        total = logp0 * coefs.sum(-1)  # exactly logp0 for a one-hot position
        ctx.multiplex = None
        if slots.size(1) > 1:
            # Every row is scored (coefficient 0 where a slot does not count): no data-dependent indexing.
            y = torch.einsum("nh,nkh->nk", hidden.float(), weight[slots].float())  # [N, K]
            if bias is not None:
                y = y + bias[slots].float()
            z, dz_dy = _transform(y, scale, softcap, temperature)
            total = total + ((z[:, 1:] - z[:, :1]) * coefs[:, 1:]).sum(-1)
            ctx.multiplex = (slots, coefs, dz_dy)
        return total, ent

    @staticmethod
    def backward(ctx, grad_total, grad_entropy):
        coef_sum = None if ctx.multiplex is None else ctx.multiplex[1].sum(-1)
        grad_logp0 = grad_total if grad_total is None or coef_sum is None else grad_total * coef_sum
        grad_hidden, grad_weight, grad_bias, *_ = ChunkedLogProbFunction.backward(ctx, grad_logp0, grad_entropy)
        if ctx.multiplex is not None and grad_total is not None:
            hidden, weight, bias = ctx.saved_tensors[:3]
            slots, coefs, dz_dy = ctx.multiplex
            # d total / d y_j: c_j for j > 0, -sum_{j>0} c_j for slot 0, times dz/dy, times the upstream gradient.
            a = torch.cat([-coefs[:, 1:].sum(-1, keepdim=True), coefs[:, 1:]], dim=-1) * dz_dy
            a = a * grad_total.float().unsqueeze(-1)  # [N, K]
            with maybe_gather_lm_head_ctx(weight, bias):
                if grad_hidden is not None:
                    extra = torch.einsum("nk,nkh->nh", a, weight[slots].float())
                    grad_hidden = grad_hidden + extra.to(grad_hidden.dtype)
                if grad_weight is not None:
                    rows = (a.unsqueeze(-1) * hidden.float().unsqueeze(1)).flatten(0, 1)  # [N*K, H]
                    grad_weight.index_add_(0, slots.flatten(), rows.to(grad_weight.dtype))
                if grad_bias is not None:
                    grad_bias.index_add_(0, slots.flatten(), a.flatten().to(grad_bias.dtype))
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _transform(y, scale, softcap, temperature):
    """The LM head's logit transform (scale, softcap, temperature) and its derivative."""
    y = y * scale
    if softcap is None:
        return y / temperature, torch.full_like(y, scale / temperature)
    t = torch.tanh(y / softcap)
    return softcap * t / temperature, scale * (1 - t * t) / temperature


def _score_slots(
    lm_head, hidden, ids, coefs, valid, *, temperature, scale, softcap, entropy, fp32_head=False
) -> MultiplexLogProbs:
    """Factorised log-probs (and entropies) of the `valid` positions [B, T] of `ids` [B, T, K] with `coefs`.

    `fp32_head`: TRL's `cast_lm_head_to_fp32` (the head runs on float32 hidden states, outside autocast).
    """
    rows = valid.flatten().nonzero().squeeze(-1)  # [N] the one host sync: the number of scored positions
    h = hidden.flatten(0, 1).index_select(0, rows)  # [N, H]
    slots = ids.flatten(0, 1).index_select(0, rows)  # [N, K]
    coefs = coefs.flatten(0, 1).index_select(0, rows).float()  # [N, K]
    weight, bias = lm_head.weight, lm_head.bias
    autocast = nullcontext()
    if fp32_head:
        h, autocast = h.float(), torch.autocast(h.device.type, enabled=False)
    with autocast, maybe_gather_lm_head_ctx(weight, bias):
        total, ent = SlotLogProbs.apply(
            h, weight, bias, slots, coefs, temperature, scale, softcap, ("entropy",) if entropy else ()
        )

    def unflatten(x):  # [N] -> [B, T], zero off the scored positions (stays connected to the graph)
        return hidden.new_zeros(valid.numel(), dtype=torch.float32).index_add(0, rows, x).view(valid.shape)

    return MultiplexLogProbs(log_probs=unflatten(total), entropy=unflatten(ent) if entropy else None)


def slot_coefficients(
    weights: torch.Tensor,
    completion_mask: torch.Tensor,
    thinking_mask: torch.Tensor | None,
    mixer: Mixer | str = "multiplex",
) -> torch.Tensor:
    """[B, T, K] weight of each slot's log-prob: the mixer's rule at thinking positions (all K slots for
    multiplex), slot 0 alone elsewhere on the completion, nothing off it."""
    mixer = get_mixer(mixer, weights.size(-1)) if isinstance(mixer, str) else mixer
    coefs = torch.zeros_like(weights, dtype=torch.float32)
    coefs[..., 0] = completion_mask.float()
    if thinking_mask is not None:
        thinking = (thinking_mask.bool() & completion_mask.bool()).unsqueeze(-1)
        coefs = torch.where(thinking, mixer.slot_coefficients(weights.float()), coefs)
    return coefs


def multiplex_logprobs(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    ids: torch.LongTensor,
    weights: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float,
    thinking_mask: torch.Tensor | None = None,
    compute_entropy: bool = False,
    batch_size: int | None = None,
    mixer: Mixer | str = "multiplex",
    cast_lm_head_to_fp32: bool = False,
    compute_aux_loss: bool = False,
):
    """Per-position log-probs [B, T] of stored multiplex completions (and entropies [B, T] when asked), in autograd.

    `input_ids`/`attention_mask` are the left-padded prompts [B, P]; `ids`/`weights` [B, T, K] the stored slots.
    Without `thinking_mask`, every position is scored on slot 0 only (a discrete completion). `mixer` sets how
    thinking slots count (multiplex: all K; MoT-G mixers: by their weights). Chunks the batch like TRL.
    `cast_lm_head_to_fp32` scores with the LM head in float32 outside autocast, as TRL's option of that name does.
    `compute_aux_loss` (MoE models) also returns the router load-balancing loss, averaged over the chunks as TRL does:
    (logps, entropies or None, aux_loss).
    """
    add_multiplex_head(unwrap_model(model))
    coefs = slot_coefficients(weights, completion_mask, thinking_mask, mixer)
    full_mask = torch.cat([attention_mask.long(), completion_mask.long()], dim=1)
    position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
    batch_size = batch_size or input_ids.size(0)
    logps, entropies, aux_losses = [], [], []
    for start in range(0, input_ids.size(0), batch_size):
        rows = slice(start, start + batch_size)
        out = model(
            input_ids=input_ids[rows],
            attention_mask=attention_mask[rows],
            position_ids=position_ids[rows],
            multiplex_ids=ids[rows],
            multiplex_weights=weights[rows],
            multiplex_slot_coefs=coefs[rows],
            multiplex_completion_mask=completion_mask[rows],
            multiplex_temperature=temperature,
            multiplex_entropy=compute_entropy,
            multiplex_fp32_head=cast_lm_head_to_fp32,
            **({"multiplex_aux_loss": True} if compute_aux_loss else {}),
        )
        logps.append(out.log_probs)
        entropies.append(out.entropy)
        aux_losses.append(out.aux_loss)
    logps = torch.cat(logps)
    if compute_aux_loss:
        return logps, torch.cat(entropies) if compute_entropy else None, torch.stack(aux_losses).mean()
    return (logps, torch.cat(entropies)) if compute_entropy else logps
