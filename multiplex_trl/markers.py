"""The end-of-thinking marker: its token ids, and where a rollout's slot-0 stream writes it.

A marker that is one token (`</think>` in reasoning tokenizers) closes thinking when slot 0 draws that token
(the method's stop rule, README: The method in one screen). A text marker that takes several tokens ("Answer:" for a chat model without a thinking token)
can be written by many token sequences: `Answer` `:` on a line of its own, `ĠAnswer` `:` after a space, `Answer`
`:**` in "**Answer:**". The rewards find the marker in the decoded text whichever tokens wrote it, so the rollout
closes thinking at the first token whose text completes the marker: `thinking_end_automaton` is that rule as a
next-state table over the marker's bytes, one lookup per step on the device.
"""

from __future__ import annotations

import functools
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


def _prefix_step(marker: list[int], symbols: int) -> torch.LongTensor:
    """The matcher one symbol at a time (Knuth-Morris-Pratt): step[q, c] [S + 1, symbols] is the longest prefix of
    `marker` that marker[:q] + [c] ends with; a symbol not in the marker goes back to the start, S stays S."""
    size = len(marker)
    step = torch.zeros(size + 1, symbols, dtype=torch.long)
    step[size] = size
    for q in range(size):
        for c in set(marker):
            seq = [*marker[:q], c]
            step[q, c] = next(k for k in range(q + 1, -1, -1) if seq[len(seq) - k :] == marker[:k])
    return step


def _read(step: torch.LongTensor, states: torch.LongTensor, token_bytes: list[bytes]) -> torch.LongTensor:
    """Run the byte matcher `step` over every token's bytes from the states `states` [R, V]: the states after them."""
    # Longest tokens first, so that the tokens still being read at byte i are the first ones; the bytes are read from
    # one flat buffer (a padded [V, longest] matrix would take V x longest x 8 bytes: gigabytes for one long token).
    order = sorted(range(len(token_bytes)), key=lambda t: -len(token_bytes[t]))
    lengths = torch.tensor([len(token_bytes[t]) for t in order], dtype=torch.long)
    flat = b"".join(token_bytes[t] for t in order)
    flat = torch.frombuffer(bytearray(flat), dtype=torch.uint8).long() if flat else torch.zeros(0, dtype=torch.long)
    starts = lengths.cumsum(0) - lengths
    states = states[:, order]
    for i in range(int(lengths[0]) if order else 0):
        n = int((lengths > i).sum())
        states[:, :n] = step[states[:, :n], flat[starts[:n] + i]]
    out = torch.empty_like(states)
    out[:, order] = states
    return out


def marker_automaton(
    marker: bytes, token_bytes: list[bytes], first_bytes: list[bytes] | None = None
) -> torch.LongTensor:
    """Next-state table [S + 1, V] of a matcher for `marker` (S bytes) in a stream of tokens whose bytes are
    `token_bytes`: state q < S is the longest prefix of the marker the text ends with, S means the text contains it.
    `table[q, t]` is the state after token t from state q (S stays S); a token with no bytes keeps the state.

    `first_bytes`: the bytes each token writes as the first token of the text (a SentencePiece decoder drops the
    leading space of `▁Answer` there). When they lead elsewhere than `token_bytes` from the start, the table gets a
    start row: [S + 2, V], row 0 before any text is written (a token with no bytes stays there), row 1 + q for q."""
    size = len(marker)
    if not size:
        raise ValueError("The end-of-thinking marker must be a non-empty string.")
    step = _prefix_step(list(marker), 256)  # one byte at a time
    vocab = len(token_bytes)
    table = _read(step, torch.arange(size + 1).unsqueeze(-1).repeat(1, vocab), token_bytes)
    if first_bytes is None:
        return table
    first = _read(step, torch.zeros(1, vocab, dtype=torch.long), first_bytes)[0]
    writes = torch.tensor([len(b) > 0 for b in token_bytes], dtype=torch.bool)
    if bool((first[writes] == table[0, writes]).all()):
        return table  # the first token reads as any other: no start row
    start = torch.where(writes, first + 1, 0)
    return torch.cat([start.unsqueeze(0), table + 1])


def token_automaton(ids: list[int], vocab: int) -> torch.LongTensor:
    """`marker_automaton` for a marker given as token ids: the table [L + 1, vocab] matching that token sequence
    exactly (any other token goes back to the start)."""
    codes = {token: code for code, token in enumerate(dict.fromkeys(ids), start=1)}  # 0: any other token
    symbol = torch.zeros(vocab, dtype=torch.long)
    symbol[list(codes)] = torch.tensor(list(codes.values()))
    return _prefix_step([codes[t] for t in ids], len(codes) + 1)[:, symbol]


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


def token_bytes(tokenizer: PreTrainedTokenizerBase, first: bool = False) -> list[bytes]:
    """The bytes each token adds to the decoded text, as the rewards read it (`skip_special_tokens=True`): decoded
    after a plain token, so that a SentencePiece word keeps its leading space (`first`: decoded alone, as the first
    token of the text). A token that is part of a character (decoded as U+FFFD) gives its raw bytes when its
    vocabulary entry spells them (byte-level BPE, `<0x..>`)."""
    # The anchor: a plain token that decodes to text ("x" may be unknown to a small vocabulary: <unk>, skipped)
    plain = ([i] for text in ("x", "a", "0", ".") for i in tokenizer.encode(text, add_special_tokens=False)[-1:])
    anchor = [] if first else next((a for a in plain if tokenizer.decode(a, skip_special_tokens=True)), [])
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
    None for a one-token marker, which closes on that token alone (the method's stop rule)."""
    if len(ids) == 1:
        return None
    # The completion's first token reads without the leading space a SentencePiece (or WordPiece) decoder strips
    # there: a marker that starts with a space is not written by `▁Answer` `:` at the start of the completion. Only
    # such a marker can tell the first token from the others, so only it pays for decoding every token alone.
    first = token_bytes(tokenizer, first=True) if marker[:1].isspace() else None
    table = marker_automaton(marker.encode("utf-8"), token_bytes(tokenizer), first)
    state, end = automaton_state(table.tolist(), ids)
    if end != len(ids):  # the marker's own tokens, read one by one, must write it with their last token
        raise ValueError(
            f"thinking_end={marker!r}: its tokens {ids} decoded one by one do not write it, so the rollout could not "
            "find it: set thinking_end to a marker the tokenizer writes token by token, e.g. '</think>'."
        )
    return table


@functools.lru_cache(maxsize=8)
def closing_rule(tokenizer: PreTrainedTokenizerBase, marker: str) -> tuple[list[int], torch.LongTensor | None]:
    """The marker's token ids and its text matcher (`thinking_end_automaton`), built once per tokenizer and marker:
    the script checks them before the model loads and the trainer reuses them, and generate and eval decode batch
    after batch, while the matcher reads the whole vocabulary (seconds for a 150k one)."""
    ids = thinking_end_ids(tokenizer, marker)
    return ids, thinking_end_automaton(tokenizer, marker, ids)
