import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from multiplex_trl.logprobs import multiplex_logprobs  # noqa: E402
from multiplex_trl.testing import tiny_model, tiny_tokenizer  # noqa: E402


torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each test compiles as a fresh process would: torch keeps compiled variants of a function across models (up to
    its recompile limit, then runs it uncompiled), so without this the tests' many shapes would add up."""
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def default_reward_marker(monkeypatch):
    """The bundled rewards' marker is module state that trainers and scripts set: each test starts from '</think>'."""
    from multiplex_trl import rewards

    monkeypatch.setattr(rewards, "THINKING_END", "</think>")


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def model(tok):
    return tiny_model(tok).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tok):
    """The tiny model and tokenizer saved to disk (TRL builds a reference model from a path)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def text_hash_reward(monkeypatch):
    """Registers the deterministic `text_hash` reward of tests/grpo_run.py (the registry is restored afterwards)."""
    from grpo_run import register_test_reward

    from multiplex_trl import rewards

    monkeypatch.setattr(rewards, "REWARD_FUNCS", dict(rewards.REWARD_FUNCS))
    register_test_reward()


@pytest.fixture
def data(tmp_path):
    """Eight tiny arithmetic problems in a local jsonl file."""
    from grpo_run import write_jsonl

    return write_jsonl(tmp_path / "problems.jsonl")


def chat_batch(tok, questions):
    """Left-padded chat prompts [B, P] that open thinking."""
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


def generate_rollout(model, tok, questions, seed=0, device="cpu", **kwargs):
    """`multiplex_generate` on chat prompts at K=3, 30 new tokens, the `</think>` marker and a seeded generator
    (`kwargs` override), on `device`: (rollout, input_ids, mask)."""
    from multiplex_trl.rollout import multiplex_generate

    input_ids, mask = (t.to(device) for t in chat_batch(tok, questions))
    args = {
        "width": 3,
        "max_new_tokens": 30,
        "thinking_end_ids": tok.encode("</think>", add_special_tokens=False),
        "eos_token_ids": [tok.eos_token_id],
        "pad_token_id": tok.pad_token_id,
        "generator": torch.Generator(device=device).manual_seed(seed),
    }
    args.update(kwargs)
    return multiplex_generate(model, input_ids, mask, **args), input_ids, mask


def recompute(model, input_ids, mask, rollout, temperature=1.0, **kwargs):
    """`multiplex_logprobs` of a rollout's stored slots (the teacher-forced pass the trainer runs)."""
    return multiplex_logprobs(
        model, input_ids, mask, rollout.ids, rollout.weights, rollout.completion_mask,
        temperature=temperature, thinking_mask=rollout.thinking_mask, **kwargs,
    )  # fmt: skip


class Steered(torch.nn.Module):
    """Wraps a causal LM and adds `bias(step)` [V] or [B, V] to its last logits: scripted distributions, real KV cache.

    Records the batch size of every forward call in `batch_sizes`.
    """

    def __init__(self, model, bias):
        super().__init__()
        self.model, self.bias, self.step, self.batch_sizes = model, bias, 0, []
        self.config = model.config

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        self.batch_sizes.append(ref.size(0))
        bias = self.bias(self.step)
        self.step += 1
        if bias is not None:
            out.logits = out.logits.clone()
            out.logits[:, -1] += bias.to(out.logits.dtype)
        return out


class Scripted(Steered):
    """Like `Steered`, but `bias(step)` replaces the last logits: exactly the scripted distribution."""

    def forward(self, **kwargs):
        out = super().forward(**kwargs)
        out.logits[:, -1] = self.bias(self.step - 1)
        return out


class RowScript(Steered):
    """Row r of a batch of `rows` follows `script(r, step)`: a token id (all the mass on it) or {token: logit}, the
    rest of the vocabulary at -1e4. Rows must finish in batch order: the eager loop's live rows are then the last
    `n` of the batch."""

    def __init__(self, model, vocab, rows, script):
        super().__init__(model, lambda step: None)
        self.vocab, self.rows, self.script = vocab, rows, script

    def forward(self, **kwargs):
        out = super().forward(**kwargs)
        step, n = self.step - 1, self.batch_sizes[-1]
        logits = torch.full((self.rows, self.vocab), -1e4)
        for row in range(self.rows):
            script = self.script(row, step)
            for t, v in (script if isinstance(script, dict) else {script: 0.0}).items():
                logits[row, t] = v
        out.logits[:, -1] = logits[self.rows - n :]
        return out


def byte_level_tokenizer():
    """Words carry their leading space (GPT-2 / SmolLM2 style): " Answer" is one token `ĠAnswer`, "Answer" another."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from multiplex_trl.testing import CHAT_TEMPLATE

    words = [
        "<pad>",
        "<eos>",
        "<unk>",
        "<|user|>",
        "<|assistant|>",
        "Answer",
        "ĠAnswer",
        ":",
        "Ġ",
        "x",
        "Ġx",
        "7",
        "Ġ7",
    ]
    words += ["Ċ", ".", "Ġ**", "**", ":**"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE.replace("<think>", "")
    return tokenizer


def check_text_marker_closes_where_written(tok, device, cache_implementation=None):
    """Rollouts on `device` steered to write `a`/`b` at random, with the text marker "ab" (`thinking_end_automaton`,
    its table given on `device` and narrower than the vocabulary, as for a model whose vocabulary is padded beyond
    the tokenizer's: ids past it write nothing): each row closes thinking at the first position whose slot-0 text
    contains the marker, and a row whose text never has it does not close."""
    from multiplex_trl.markers import thinking_end_automaton, thinking_end_ids

    ids, width = thinking_end_ids(tok, "ab"), len(tok) - 20
    table = thinking_end_automaton(tok, "ab", ids)[:, :width].to(device)
    bias = torch.zeros(len(tok), device=device)
    bias[ids] = 6.0
    r, _, _ = generate_rollout(
        Steered(tiny_model(tok).to(device).eval(), lambda step: bias), tok, ["q", "a question", "x", "why?"] * 4,
        device=device, thinking_end_ids=ids, thinking_end_automaton=table, max_new_tokens=12,
        cache_implementation=cache_implementation,
    )  # fmt: skip
    closed = 0
    for row, length in enumerate(r.lengths()):
        stream = r.ids[row, :length, 0].tolist()
        text = [tok.decode([t for t in stream[:e] if t < width]) for e in range(1, length + 1)]
        written = next((e for e in range(1, length + 1) if "ab" in text[e - 1]), None)
        assert bool(r.closed[row]) == (written is not None), stream
        if written is not None:
            assert r.thinking_mask[row, : written - 1].all() and not r.thinking_mask[row, written - 1 :].any()
            closed += 1
    assert 0 < closed < len(r.lengths()), closed  # both outcomes
