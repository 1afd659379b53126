"""The end-of-thinking marker: its token ids, and where a rollout's slot-0 stream writes it.

A marker that is one token (`</think>` in reasoning tokenizers) closes thinking when slot 0 draws that token
(METHOD.md section 1). A text marker that takes several tokens ("Answer:" for a chat model without a thinking token)
can be written by many token sequences: `Answer` `:` on a line of its own, `ĠAnswer` `:` after a space, `Answer`
`:**` in "**Answer:**". The rewards find the marker in the decoded text whichever tokens wrote it, so the rollout
closes thinking at the first token whose text completes the marker: `thinking_end_automaton` is that rule as a
next-state table over the marker's bytes, one lookup per step on the device.
"""

from __future__ import annotations

import re

import torch
from transformers import PreTrainedTokenizerBase


def thinking_end_ids(tokenizer: PreTrainedTokenizerBase, marker: str) -> list[int]:
    """Token ids of the end-of-thinking marker; raises if the tokenizer cannot encode it faithfully."""
    ids = tokenizer.encode(marker, add_special_tokens=False)
    if not ids or tokenizer.unk_token_id in ids or tokenizer.decode(ids) != marker:
        raise ValueError(
            f"thinking_end={marker!r} cannot be encoded by this tokenizer (got ids {ids}): set thinking_end to a "
            "string the tokenizer round-trips, e.g. '</think>' for reasoning models."
        )
    if tokenizer.decode(ids, skip_special_tokens=True) != marker:
        # TRL decodes the completions the rewards read with skip_special_tokens=True, and so do generate and eval:
        # a special marker vanishes from the text, and every completion would read as unclosed (scored 0).
        raise ValueError(
            f"thinking_end={marker!r} is a special token of this tokenizer, so decoding with skip_special_tokens=True "
            "(TRL's completions for the rewards, generate, eval) drops it and no answer would be graded: set "
            '"special": false for it in tokenizer.json\'s added_tokens, or set thinking_end to a marker kept as text.'
        )
    return ids


def check_prompts_open_thinking(tokenizer, prompt_ids, marker: str, marker_ids: list[int]) -> None:
    """A prompt that already ends with the marker (a chat template that closes thinking) would have its answer decoded
    and trained as multiplex thinking: refuse it. `prompt_ids`: each prompt's ids, without padding."""
    tail = len(marker_ids) + 8  # the marker and some trailing whitespace tokens
    for ids in prompt_ids:
        text = tokenizer.decode(ids[-tail:])
        if marker.strip() and text.rstrip().endswith(marker.strip()):
            raise ValueError(
                f"a prompt already ends with thinking_end={marker!r} (...{text[-40:]!r}), so its completion would have "
                "no thinking phase: use a chat template that opens thinking, or set thinking_end to the marker the "
                "model writes."
            )


def marker_automaton(marker: bytes, token_bytes: list[bytes]) -> torch.LongTensor:
    """Next-state table [S + 1, V] of a matcher for `marker` (S bytes) in a stream of tokens whose bytes are
    `token_bytes`: state q < S is the longest prefix of the marker the text ends with, S means the text contains it.
    `table[q, t]` is the state after token t from state q (S stays S); a token with no bytes keeps the state."""
    size = len(marker)
    if not size:
        raise ValueError("The end-of-thinking marker must be a non-empty string.")
    # One byte at a time (Knuth-Morris-Pratt): step[q, b] is the longest prefix of the marker that marker[:q] + b
    # ends with; a byte not in the marker goes back to the start.
    step = torch.zeros(size + 1, 256, dtype=torch.long)
    step[size] = size
    for q in range(size):
        for b in set(marker):
            text = marker[:q] + bytes([b])
            step[q, b] = next(k for k in range(q + 1, -1, -1) if text.endswith(marker[:k]))
    # Every token from every state at once, its bytes in turn; longest tokens first, so that the tokens still being
    # read at byte i are the first ones.
    order = sorted(range(len(token_bytes)), key=lambda t: -len(token_bytes[t]))
    longest = len(token_bytes[order[0]]) if order else 0
    data = b"".join(token_bytes[t].ljust(longest, b"\0") for t in order)
    padded = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(len(order), longest).long()
    lengths = torch.tensor([len(token_bytes[t]) for t in order], dtype=torch.long)
    states = torch.arange(size + 1).unsqueeze(-1).repeat(1, len(order))  # [S + 1, V] in `order`
    for i in range(longest):
        n = int((lengths > i).sum())
        states[:, :n] = step[states[:, :n], padded[:n, i]]
    table = torch.empty_like(states)
    table[:, order] = states
    return table


def token_automaton(ids: list[int], vocab: int) -> torch.LongTensor:
    """`marker_automaton` for a marker given as token ids: the table [L + 1, vocab] matching that token sequence
    exactly (any other token goes back to the start)."""
    size = len(ids)
    table = torch.zeros(size + 1, vocab, dtype=torch.long)
    table[size] = size
    for q in range(size):
        for token in set(ids):
            seq = [*ids[:q], token]
            table[q, token] = next(k for k in range(q + 1, -1, -1) if seq[len(seq) - k :] == ids[:k])
    return table


def automaton_state(table, tokens: list[int], state: int = 0) -> tuple[int, int | None]:
    """Run `table` over `tokens` from `state`: (the state after them, the index just past the token that completed
    the marker, or None). The rollout's rule, on the host: `thinking_end_automaton` checks the marker's own tokens.
    Ids past the table keep the state, as in the rollout."""
    accept = len(table) - 1
    for index, token in enumerate(tokens):
        state = table[state][token] if token < len(table[state]) else state
        if state == accept:
            return state, index + 1
    return state, None


# GPT-2's byte-level alphabet: the printable character each byte is written as in byte-level BPE vocabularies.
def _byte_level_alphabet() -> dict[str, int]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    chars = {chr(b): b for b in printable}
    chars.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return chars


BYTE_LEVEL = _byte_level_alphabet()
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes]:
    """The bytes each token adds to the decoded text, as the rewards read it (`skip_special_tokens=True`): decoded
    after a plain token, so that a SentencePiece word keeps its leading space. A token that is part of a character
    (decoded as U+FFFD) gives its raw bytes when its vocabulary entry spells them (byte-level BPE, `<0x..>`)."""
    anchor = tokenizer.encode("x", add_special_tokens=False)[-1:]
    head = tokenizer.decode(anchor, skip_special_tokens=True)
    vocab = len(tokenizer)
    pairs = tokenizer.batch_decode([anchor + [t] for t in range(vocab)], skip_special_tokens=True)
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab)))
    out = []
    for token, (text, piece) in enumerate(zip(pairs, pieces)):
        text = text[len(head) :] if text.startswith(head) else tokenizer.decode([token], skip_special_tokens=True)
        if "\ufffd" in text and isinstance(piece, str):
            if fallback := BYTE_FALLBACK.fullmatch(piece):
                out.append(bytes([int(fallback.group(1), 16)]))
                continue
            if piece and all(ch in BYTE_LEVEL for ch in piece):
                out.append(bytes(BYTE_LEVEL[ch] for ch in piece))
                continue
        out.append(text.encode("utf-8"))
    return out


def thinking_end_automaton(tokenizer: PreTrainedTokenizerBase, marker: str, ids: list[int]) -> torch.LongTensor | None:
    """The rollout's closing rule for a text marker of several tokens (`marker_automaton` over this tokenizer's
    tokens): thinking closes at the first slot-0 token whose text completes the marker, whichever tokens wrote it.
    None for a one-token marker, which closes on that token alone (METHOD.md's rule)."""
    if len(ids) == 1:
        return None
    table = marker_automaton(marker.encode("utf-8"), token_bytes(tokenizer))
    state, end = automaton_state(table.tolist(), ids)
    if end != len(ids):  # the marker's own tokens, read one by one, must write it with their last token
        raise ValueError(
            f"thinking_end={marker!r}: its tokens {ids} decoded one by one do not write it, so the rollout could not "
            "find it: set thinking_end to a marker the tokenizer writes token by token, e.g. '</think>'."
        )
    return table
