"""Tiny offline models and tokenizers for tests, benchmarks and CPU smoke runs (no downloads)."""

from __future__ import annotations

import string
from collections import Counter

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast


SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<think>", "</think>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<eos>{% else %}<|assistant|>{{ m['content'] }}<eos>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>{% endif %}"
)


def tiny_tokenizer(with_think_token: bool = True) -> PreTrainedTokenizerFast:
    """A character-level tokenizer with a chat template that opens thinking; optionally without a `</think>` token."""
    specials = [t for t in SPECIAL_TOKENS if with_think_token or t not in ("<think>", "</think>")]
    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Specials are matched first by the added-token machinery; everything else splits into characters.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in specials if t.startswith("<|")]})
    if with_think_token:
        # Like reasoning models: the markers are single tokens but are kept in decoded text.
        tokenizer.add_tokens(["<think>", "</think>"], special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATE if with_think_token else CHAT_TEMPLATE.replace("<think>", "")
    return tokenizer


def tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    max_positions: int = 1024,
    sliding_window: int | None = None,
):
    """A randomly initialised 2-layer Llama sized for the tiny tokenizer (float32, eager attention); with
    `sliding_window`, the same as a Mistral whose layers attend within that many positions."""
    window = {} if sliding_window is None else {"sliding_window": sliding_window}
    return _tiny(
        *((LlamaConfig, LlamaForCausalLM) if sliding_window is None else (MistralConfig, MistralForCausalLM)),
        tokenizer,
        seed,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        max_position_embeddings=max_positions,
        **window,
    )


# MoE families for tiny_moe_model: (config class, model class, their own names for experts and expert width).
MOE_FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, "moe_intermediate_size": 32}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "intermediate_size": 32}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "intermediate_size": 32}),
    # attention sinks and alternating sliding windows
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {"num_local_experts": 4, "intermediate_size": 32, "sliding_window": 8},
    ),
}


def tiny_moe_model(
    tokenizer: PreTrainedTokenizerFast, family: str = "qwen3_moe", seed: int = 0, router_aux_loss_coef: float = 0.5
):
    """A randomly initialised 2-layer MoE causal LM of `family` (4 experts, 2 per token) sized for the tiny tokenizer,
    with a load-balancing loss coefficient large enough to move the loss."""
    import transformers

    config_name, model_name, experts = MOE_FAMILIES[family]
    return _tiny(
        getattr(transformers, config_name),
        getattr(transformers, model_name),
        tokenizer,
        seed,
        hidden_size=32,
        num_hidden_layers=2,
        head_dim=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=router_aux_loss_coef,
        **{"intermediate_size": 64, **experts},
    )


def _tiny(config_class, model_class, tokenizer: PreTrainedTokenizerFast, seed: int, **config):
    """A randomly initialised `model_class` for the tiny tokenizer (float32, eager attention, 4 heads, 2 KV heads)."""
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=len(tokenizer),
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        attn_implementation="eager",
        **config,
    )
    model = model_class(config)
    # Spread the output distribution a little so sampling branches (random init gives near-uniform logits).
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


class LoopOps(TorchDispatchMode):
    """Counts the aten ops run under it, by name, split by whether they ran inside `model`'s forward (hooks on the
    model, removed on exit): what a decode loop costs around its forward. Only top-level ops are seen (not the ops
    inside another op's kernel)."""

    # Ops that make the host wait for the device on CUDA (a tensor's value or size decided on the device).
    SYNC_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select"})

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inside, self.counts = False, Counter()
        self._hooks = [
            model.register_forward_pre_hook(lambda *_: setattr(self, "inside", True)),
            model.register_forward_hook(lambda *_: setattr(self, "inside", False)),
        ]

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.inside, func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def around(self) -> Counter:
        """Op name -> count, outside the forward."""
        return Counter({op: n for (inside, op), n in self.counts.items() if not inside})

    def syncs_around(self) -> int:
        return sum(n for op, n in self.around().items() if op in self.SYNC_OPS)
