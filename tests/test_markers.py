"""The end-of-thinking marker's matcher (multiplex_trl/markers.py) against the rewards' reading of the text: thinking
closes at the first token after which the decoded completion contains the marker, whichever tokens wrote it."""

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from multiplex_trl.markers import (
    automaton_state,
    marker_automaton,
    thinking_end_automaton,
    thinking_end_ids,
    token_automaton,
    token_bytes,
)


MARKERS = ["Answer:", "**Final Answer**", "</answer>", "答案：", "\nAnswer:", "aa:aab"]
CORPUS = [
    "Let me think. x = 7, so 2x is 14.\nAnswer: 14",
    "**Answer:** 42 and **Final Answer**: 42",
    "<answer>12</answer> then </answer>",
    "思考一下。答案：七。答案是七",
    "the answer: aa:aa:aab, aab aa: b",
    "Answer\n: no, Answer : no, Final Answer yes",
] * 20


def bpe_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained here: 'byte_level' (GPT-2 / Qwen / SmolLM2 style, CJK characters split into byte
    tokens) or 'sentencepiece' (Llama / Mistral style: Metaspace words, `<0x..>` byte-fallback tokens)."""
    specials = ["<pad>", "<eos>", "<unk>", "<|user|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if style == "byte_level":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=alphabet, special_tokens=specials)
        tok.train_from_iterator(CORPUS, trainer)
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        latin = [line.encode("ascii", "ignore").decode() for line in CORPUS]  # CJK only through byte fallback
        tok.train_from_iterator(latin, trainers.BpeTrainer(vocab_size=80, special_tokens=specials))
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        for byte in range(256):
            vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
        spec["model"]["byte_fallback"] = True
        tok = Tokenizer.from_str(json.dumps(spec))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>"]})
    return tokenizer


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request):
    return bpe_tokenizer(request.param)


def random_stream(tokenizer, marker: str, rng: random.Random) -> list[int]:
    """Token ids as a model might sample them: pieces encoded separately (so not the canonical tokenization), parts of
    the marker, the marker after other text, random tokens and special tokens (which decode to nothing)."""
    whole = [marker, " " + marker, "**" + marker + "**"]
    filler = [" x", "\n", ":", "答", "7", "*"]
    stream = []
    while len(stream) < 12:
        roll, cut = rng.random(), rng.randrange(1, len(marker))
        if roll < 0.1:
            text = rng.choice(whole)
        elif roll < 0.5:
            text = rng.choice([marker[:cut], marker[cut:]])
        elif roll < 0.7:
            text = rng.choice(filler)
        else:
            stream.append(rng.randrange(len(tokenizer)) if roll < 0.9 else tokenizer.convert_tokens_to_ids("<|user|>"))
            continue
        stream += tokenizer.encode(text, add_special_tokens=False)
    return stream


def first_written(tokenizer, stream: list[int], marker: str) -> int | None:
    """The rewards' reading: the fewest tokens whose decoded text (special tokens skipped) contains the marker."""
    for end in range(1, len(stream) + 1):
        if marker in tokenizer.decode(stream[:end], skip_special_tokens=True):
            return end
    return None


@pytest.mark.parametrize("marker", MARKERS)
def test_the_matcher_closes_where_the_decoded_text_first_contains_the_marker(tokenizer, marker):
    """Random token streams: the matcher's first accepting token is exactly where the decoded text first contains
    the marker, whichever tokens wrote it (split across tokens, merged with the text around it, in byte tokens)."""
    ids = thinking_end_ids(tokenizer, marker)
    table = thinking_end_automaton(tokenizer, marker, ids)
    assert table is not None and table.shape == (len(marker.encode()) + 1, len(tokenizer))
    rows = table.tolist()
    rng = random.Random(f"{marker}-{len(tokenizer)}")
    closed = 0
    for _ in range(150):
        stream = random_stream(tokenizer, marker, rng)
        _, end = automaton_state(rows, stream)
        assert end == first_written(tokenizer, stream, marker), tokenizer.convert_ids_to_tokens(stream)
        closed += end is not None
    assert 15 < closed < 135, closed  # both outcomes are exercised


def test_the_rewards_marker_spellings_close_thinking_on_a_byte_level_tokenizer():
    """The cases the token-sequence match missed, on a byte-level vocabulary: the marker after a space, merged with
    the text after it (`Answer` `:**`), and written in byte tokens (答案：)."""
    tokenizer = bpe_tokenizer("byte_level")

    def encode(*texts):
        return [i for text in texts for i in tokenizer.encode(text, add_special_tokens=False)]

    for marker, stream in [
        ("Answer:", encode("x Answer: 7")),  # `ĠAnswer` `:`
        ("Answer:", encode("**Answer:** 7")),  # `Answer` `:**`
        ("答案：", encode("思考答", "案：七")),  # 答 and 案 in byte tokens
    ]:
        ids = thinking_end_ids(tokenizer, marker)
        assert not any(stream[i : i + len(ids)] == ids for i in range(len(stream)))  # not the marker's own tokens
        _, end = automaton_state(thinking_end_automaton(tokenizer, marker, ids).tolist(), stream)
        assert end is not None and marker in tokenizer.decode(stream[:end])
        assert marker not in tokenizer.decode(stream[: end - 1])


def test_a_one_token_marker_keeps_the_token_rule(tok):
    """`</think>` as one token closes on that token alone (the method's stop rule): no text matcher."""
    assert thinking_end_automaton(tok, "</think>", thinking_end_ids(tok, "</think>")) is None


def test_token_bytes_spell_what_each_token_adds_to_the_text():
    tokenizer = bpe_tokenizer("sentencepiece")
    spelled = token_bytes(tokenizer)
    word = tokenizer.convert_tokens_to_ids("▁Answer") if "▁Answer" in tokenizer.get_vocab() else None
    if word is not None:
        assert spelled[word] == b" Answer"  # its leading space, as it reads after other text
    assert spelled[tokenizer.convert_tokens_to_ids("<0xE7>")] == b"\xe7"  # a byte-fallback token: its byte
    assert spelled[tokenizer.convert_tokens_to_ids("<|user|>")] == b""  # special: skipped by the rewards' decode
    bpe = bpe_tokenizer("byte_level")
    fragment = next(t for t, piece in enumerate(bpe.convert_ids_to_tokens(range(len(bpe)))) if piece == "ç")
    assert token_bytes(bpe)[fragment] == b"\xe7"


def test_marker_automaton_by_hand():
    """Bytes 'aab' after 'aa': the longest prefix the text ends with survives a mismatch (Knuth-Morris-Pratt), and a
    token with no bytes keeps the state."""
    table = marker_automaton(b"aab", [b"a", b"b", b"x", b"", b"aab!", b"ba"])
    a, b, x, empty, whole, ba = range(6)
    assert table[:, a].tolist() == [1, 2, 2, 3]
    assert table[:, b].tolist() == [0, 0, 3, 3]
    assert table[:, x].tolist() == [0, 0, 0, 3]
    assert table[:, empty].tolist() == [0, 1, 2, 3]
    assert table[:, whole].tolist() == [3, 3, 3, 3]  # the marker inside one token, text after it included
    assert table[:, ba].tolist() == [1, 1, 3, 3]
    assert automaton_state(table.tolist(), [a, x, a, a, a, b, x]) == (3, 6)
    assert automaton_state(table.tolist(), [a, a, x, b]) == (0, None)


def test_token_automaton_matches_the_token_sequence_exactly():
    table = token_automaton([5, 5, 6], vocab=8)
    assert table.shape == (4, 8)
    assert automaton_state(table.tolist(), [5, 5, 5, 6, 1]) == (3, 4)
    assert automaton_state(table.tolist(), [5, 6, 5, 7, 6]) == (0, None)


def test_a_marker_its_own_tokens_do_not_write_is_refused(monkeypatch):
    """A tokenizer whose tokens, read one at a time, do not write the marker they encode (here: the marker's last
    token reads as nothing) gets a one-line error naming thinking_end, not a rollout that never closes thinking."""
    from multiplex_trl import markers

    tokenizer = bpe_tokenizer("byte_level")
    ids = thinking_end_ids(tokenizer, "Answer:")
    spelled = token_bytes(tokenizer)
    spelled[ids[-1]] = b""
    monkeypatch.setattr(markers, "token_bytes", lambda tokenizer: spelled)
    with pytest.raises(ValueError, match=r"^thinking_end='Answer:': its tokens .* decoded one by one do not write it"):
        thinking_end_automaton(tokenizer, "Answer:", ids)


def legacy_sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2 / Mistral v0.1 style: `▁` prepended by the normalizer, decoded with the first space stripped."""
    from tokenizers import normalizers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<eos>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>"]})
    return tokenizer


def test_a_marker_with_a_leading_space_is_not_written_by_the_completions_first_token():
    """A SentencePiece decoder drops the leading space of the completion's first token: `▁Answer` `:` there reads
    'Answer:', which does not contain ' Answer:'; after other text it does."""
    tokenizer = legacy_sentencepiece_tokenizer()
    marker = " Answer:"
    ids = thinking_end_ids(tokenizer, marker)
    rows = thinking_end_automaton(tokenizer, marker, ids).tolist()
    first = tokenizer.encode("Answer: 7", add_special_tokens=False)
    later = tokenizer.encode("so Answer: 7", add_special_tokens=False)
    assert automaton_state(rows, first)[1] is first_written(tokenizer, first, marker) is None
    assert automaton_state(rows, later)[1] == first_written(tokenizer, later, marker) is not None
    rng = random.Random(marker)
    for _ in range(150):
        stream = random_stream(tokenizer, marker, rng)
        assert automaton_state(rows, stream)[1] == first_written(tokenizer, stream, marker)


def test_token_bytes_anchor_on_a_vocabulary_without_x():
    """The anchor token is plain text even where 'x' is unknown (<unk>, skipped as special): words keep their space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"])
    tok.train_from_iterator(["the answer is 7, then the answer is 9"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    ids = thinking_end_ids(tokenizer, "the answer is")
    assert thinking_end_automaton(tokenizer, "the answer is", ids) is not None


def test_marker_automaton_reads_a_very_long_token():
    table = marker_automaton(b"ab", [b"x" * 5000 + b"a", b"b", b"ab" + b"y" * 3000, b""] * 2000)
    assert table[:, :4].tolist() == [[1, 0, 2, 0], [1, 2, 2, 1], [2, 2, 2, 2]]
