"""Tiny offline models and tokenizers for tests, benchmarks and CPU smoke runs (no downloads)."""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
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
    torch.manual_seed(seed)
    config_class = LlamaConfig if sliding_window is None else MistralConfig
    window = {} if sliding_window is None else {"sliding_window": sliding_window}
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        attn_implementation="eager",
        **window,
    )
    model = (LlamaForCausalLM if sliding_window is None else MistralForCausalLM)(config)
    # Spread the output distribution a little so sampling branches (random init gives near-uniform logits).
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
