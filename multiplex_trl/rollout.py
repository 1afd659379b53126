"""The multiplex rollout: a KV-cache decode loop with a thinking phase (K merged slots) and an answer phase."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .markers import token_automaton
from .mixers import Mixer, get_mixer
from .mixers.base import draw_token
from .sampling import decode_step, prepare_logits
from .static_decode import (
    check_decode_options,
    check_static_attention,
    compiled_decode_step,
    has_recurrent_layers,
    static_cache,
)


# The static loop asks the device "are all rows done?" only every this many steps, so the host can queue the next
# steps while the device works (finished rows cost nothing extra there: they stay in the fixed-shape batch anyway).
STATIC_STOP_CHECK_EVERY = 8


@dataclass
class MultiplexRollout:
    """What a rollout stores for every completion position t (README: The method in one screen)."""

    ids: torch.LongTensor  # [B, T, K] slot ids; one-hot positions are [tok, pad, ...]
    weights: torch.FloatTensor  # [B, T, K] merge weights; one-hot positions are [1, 0, ...]
    thinking_mask: torch.BoolTensor  # [B, T] positions decoded with K merged slots
    completion_mask: torch.BoolTensor  # [B, T] real positions, up to and including EOS
    forced_mask: torch.BoolTensor  # [B, T] marker tokens forced by the thinking budget (not sampled)
    logprobs: torch.FloatTensor  # [B, T] log-prob at rollout time, summed over slots at thinking positions
    closed: torch.BoolTensor  # [B] rows whose thinking ended with the marker (sampled or forced)

    @property
    def completion_ids(self) -> torch.LongTensor:
        """Slot-0 ids [B, T]: the readable text."""
        return self.ids[..., 0]

    def lengths(self) -> list[int]:
        return self.completion_mask.sum(-1).tolist()


@torch.no_grad()
def multiplex_generate(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    *,
    width: int,
    merge: str = "weighted",
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    min_p: float | None = None,
    max_new_tokens: int,
    thinking_end_ids: list[int],
    eos_token_ids: list[int],
    pad_token_id: int,
    thinking_end_automaton: torch.Tensor | None = None,
    max_thinking_tokens: int | None = None,
    generator: torch.Generator | None = None,
    mixer: Mixer | str = "multiplex",
    cache_implementation: str | None = None,
    compile: bool = False,
) -> MultiplexRollout:
    """Sample multiplex completions for left-padded prompts [B, P].

    Thinking phase: K draws per position, fed as their merged embedding, until the slot-0 stream completes the
    `thinking_end_ids` marker, or the budget forces it. A marker of several tokens is matched by
    `thinking_end_automaton` when given (`markers.thinking_end_automaton`: the first token whose text completes the
    marker, whichever tokens wrote it), else as that token sequence. Answer phase: one token per position. EOS in
    slot 0 ends a row; finished rows are dropped from the batch (and the KV cache) so they cost nothing.
    `mixer` swaps the multiplex draw for another token-mixing rule (a name or a `Mixer`, see `multiplex_trl.mixers`).

    `cache_implementation="static"` decodes with a preallocated KV cache and fixed shapes instead: finished rows
    stay in the batch (their positions are simply not stored), and the end check (a host sync) runs every
    `STATIC_STOP_CHECK_EVERY` steps. `compile=True` then runs each decode step (`sampling.decode_step`: slot merge,
    forward, next logits' temperature and filters) through `torch.compile` (CUDA graphs on a GPU). Both draw what the
    default loop draws, up to floating-point rounding, until a row finishes (the default loop then samples a smaller
    batch: other random numbers, same distribution; tests/test_fast_decode.py).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}.")
    check_decode_options(cache_implementation, compile)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = input_ids.size(1)  # left padding: the longest prompt (a sync only where padding alone overflows)
    if (
        isinstance(limit, int)
        and longest + max_new_tokens > limit
        and int(attention_mask.sum(-1).max()) + max_new_tokens > limit
    ):
        raise ValueError(
            f"the longest prompt plus max_new_tokens={max_new_tokens} exceeds the model's max_position_embeddings="
            f"{limit}: shorten the prompts or lower max_new_tokens."
        )
    static = cache_implementation == "static"
    if static:
        check_static_attention(model.config)
    if isinstance(mixer, str):
        mixer = get_mixer(mixer, width, **({"merge": merge} if mixer == "multiplex" else {}))
    # Per-slot log-prob coefficients at mixed positions: the method's likelihood, or a plain sum if it has none.
    coefficients = mixer.slot_coefficients if mixer.trainable else torch.ones_like
    cold_stop = mixer.cold_stop_entropy
    device = input_ids.device
    batch, k = input_ids.size(0), width
    marker = torch.tensor(thinking_end_ids, device=device)  # [L]
    marker_0 = marker[0]
    eos = torch.tensor(eos_token_ids, device=device)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
    embed = model.get_input_embeddings()

    # Per active row state; `rows` maps active rows back to the batch. Finished rows leave these tensors.
    rows = torch.arange(batch, device=device)
    prompt_len = input_ids.size(1)
    mask = torch.cat([attention_mask.long(), attention_mask.new_ones(batch, max_new_tokens).long()], dim=-1)
    position = attention_mask.long().sum(-1)  # next position id of each row
    thinking = torch.ones(batch, dtype=torch.bool, device=device)
    thought = torch.zeros(batch, dtype=torch.long, device=device)  # thinking positions so far
    forcing = torch.full((batch,), -1, dtype=torch.long, device=device)  # index into marker while forced, else -1
    cold = torch.zeros(batch, dtype=torch.long, device=device)  # consecutive low-entropy thinking positions
    state = torch.zeros(batch, dtype=torch.long, device=device)  # the matcher's state on the slot-0 stream
    one_hot = torch.zeros(k, device=device)
    one_hot[0] = 1.0
    slot_is_pad = ~one_hot.bool()
    may_force = max_thinking_tokens is not None or cold_stop is not None
    # Per-step records [T, B, ...], allocated once and written at each step's active rows. Small tensors kept alive
    # at every step instead would fragment the CPU heap around the growing KV cache (page faults growing with length:
    # 1.4x generate's time at 2048 tokens).
    rec_ids = torch.full((max_new_tokens, batch, k), pad_token_id, dtype=torch.long, device=device)
    rec_w = torch.zeros((max_new_tokens, batch, k), dtype=torch.float32, device=device)
    rec_logp = torch.zeros((max_new_tokens, batch), dtype=torch.float32, device=device)
    merged_at, forced_at = torch.zeros((2, max_new_tokens, batch), dtype=torch.bool, device=device)
    # Per-row results, written as rows leave the batch and at the end: stored positions (the static loop counts them
    # at every step instead), and whether thinking closed (with the marker, sampled or forced).
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    closed = torch.zeros(batch, dtype=torch.bool, device=device)

    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    decode, cache, alive = partial(decode_step, model), None, None
    if static:  # one cache of a bucketed length for the whole rollout; the mask spans it at every step
        if compile:  # the compiled step decodes into a cache it keeps (fixed addresses for CUDA graphs)
            decode = compiled_decode_step(model)
            cache, cache_len = decode.cache_for(model, batch, prompt_len + max_new_tokens)
        else:
            cache, cache_len = static_cache(model.config, prompt_len + max_new_tokens)
        mask = torch.cat([mask, mask.new_zeros(batch, cache_len - mask.size(1))], dim=-1)
        alive = torch.ones(batch, dtype=torch.bool, device=device)
    # The static prefill's mask spans the cache (ALiBi models build their bias from its length), but recurrent layers
    # (mamba, conv, linear attention) zero the prompt's padding with the mask's last P columns, the cache's empty tail
    # there: a model with such layers prefills with the prompts' own mask, as the eager loop does.
    out = model(
        input_ids=input_ids,
        attention_mask=mask if static and not has_recurrent_layers(cache) else attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    filtered, full_logprobs = prepare_logits(out.logits[:, -1], **sampling)
    # A marker of several tokens: a matcher over the slot-0 stream, its next-state table [states, V] flattened
    # (the last state: the marker is written). Ids past the table (a vocabulary padded beyond the tokenizer's) keep
    # the state.
    table, vocab = None, full_logprobs.size(-1)
    if marker.numel() > 1:
        table = (
            thinking_end_automaton if thinking_end_automaton is not None else token_automaton(thinking_end_ids, vocab)
        )
        if table.size(1) < vocab:
            same = torch.arange(table.size(0), device=table.device).unsqueeze(-1).expand(-1, vocab - table.size(1))
            table = torch.cat([table, same], dim=-1)
        written_state, table = table.size(0) - 1, table[:, :vocab].flatten().to(device)

    for t in range(max_new_tokens):
        ids, weights = mixer.draw(filtered, full_logprobs, generator)  # [b, K]
        if not mixer.slot0_is_draw:  # answer rows sample their token (a top-k mixer's slot 0 is not a draw)
            ids = torch.where(thinking.unsqueeze(-1), ids, draw_token(filtered, generator))
        forced = None
        if may_force:  # budget reached, or confident for long enough (cold stop): force the marker from here on
            stop = thought >= max_thinking_tokens if max_thinking_tokens is not None else torch.zeros_like(thinking)
            if cold_stop is not None:
                # The policy's entropy at the sampling temperature, before the filters (Soft Thinking's sampler):
                # top-p alone makes a 0.97 / 0.03 distribution one-hot, with a filtered entropy of 0.
                entropy = torch.special.entr(full_logprobs.exp()).sum(-1)
                cold = torch.where(thinking & (entropy < cold_stop), cold + 1, 0)
                stop = stop | (cold >= mixer.cold_stop_steps)
            forcing = torch.where(thinking & (forcing < 0) & stop, 0, forcing)
            forced = forcing >= 0
            forced_tok = marker[forcing.clamp(min=0, max=marker.numel() - 1)]
            ids = torch.where(forced.unsqueeze(-1), forced_tok.unsqueeze(-1), ids)
        logps = full_logprobs.gather(-1, ids)
        slot0 = ids[:, 0]
        open_rows = thinking & alive if static else thinking  # static: a finished row's thinking state stays
        if table is None:
            closes = open_rows & (slot0 == marker_0)
        else:  # one lookup: the matcher's next state after the slot-0 token
            state = table[state * vocab + slot0]
            closes = open_rows & ((state == written_state) | (forcing == marker.numel() - 1))
        ends = torch.isin(slot0, eos)
        next_thinking = thinking & ~closes
        merged = next_thinking & ~ends  # thinking rows that neither close thinking nor end here
        if forced is not None:
            ends = ends & ~forced
            merged = merged & ~forced
            forcing = torch.where(forced, forcing + 1, forcing)
            # Done once the marker is complete, or once it closes thinking early: a marker whose prefix is its suffix
            # ([a, a], "**Answer**") can be completed by the stream's last free token and the first forced one.
            forcing = torch.where((forcing >= marker.numel()) | closes, -1, forcing)
        # Everything but a merged position is stored and fed one-hot: [tok, pad, ...] with weights [1, 0, ...].
        weights = torch.where(merged.unsqueeze(-1), weights, one_hot)
        ids = ids.masked_fill(~merged.unsqueeze(-1) & slot_is_pad, pad_token_id)
        step_logp = torch.where(merged, (coefficients(weights) * logps).sum(-1), logps[:, 0])
        rec_ids[t, rows], rec_w[t, rows], rec_logp[t, rows], merged_at[t, rows] = ids, weights, step_logp, merged
        if forced is not None:
            forced_at[t, rows] = forced
        if max_thinking_tokens is not None:
            thought = thought + merged
        thinking = next_thinking

        last = t == max_new_tokens - 1
        if static:  # fixed shapes: finished rows stay in the batch, and their later positions are not stored
            lengths = lengths + alive
            alive = alive & ~ends
            if last or ((t + 1) % STATIC_STOP_CHECK_EVERY == 0 and not bool(alive.any())):  # a sync every few steps
                break
            n_done = 0
        else:
            if last:
                break
            n_done = int(ends.sum())  # the one host sync per step
            if n_done == rows.numel():
                break
        if n_done:
            lengths[rows], closed[rows] = t + 1, ~thinking  # final for the rows leaving (the rest: later)
            keep = (~ends).nonzero().squeeze(-1)
            cache.reorder_cache(keep)  # every layer kind drops the rows (hybrid models: recurrent states too)
            rows, mask, position, thinking, thought, forcing, state, cold, ids, weights = (
                x[keep] for x in (rows, mask, position, thinking, thought, forcing, state, cold, ids, weights)
            )

        # The next position's filtered logits and log-softmax (compiled: read before the next call replaces them)
        filtered, full_logprobs = decode(
            embed(ids).detach(),  # detached: a requires-grad hook on the embeddings changes nothing under no_grad
            weights,
            attention_mask=mask if static else mask[:, : prompt_len + t + 1],
            position_ids=position.unsqueeze(-1),
            cache=cache,
            sampling=sampling,
        )
        position = position + 1

    closed[rows] = ~thinking  # the rows still in the batch
    if not static:
        lengths[rows] = t + 1
    # [T, B, ...] -> [B, T, ...]; static: drop the steps decoded after the last row finished (checked every few steps).
    length = int(lengths.max()) if static else t + 1

    def batch_major(records):
        return records[:length].transpose(0, 1).contiguous()

    completion_mask = torch.arange(length, device=device) < lengths.unsqueeze(-1)
    real = completion_mask.unsqueeze(-1)
    out_ids = batch_major(rec_ids).masked_fill_(~real, pad_token_id)
    out_w = batch_major(rec_w).masked_fill_(~real, 0.0)
    logprobs = batch_major(rec_logp).masked_fill_(~completion_mask, 0.0)
    thinking_mask = batch_major(merged_at) & completion_mask
    forced_mask = batch_major(forced_at) & completion_mask
    return MultiplexRollout(
        ids=out_ids,
        weights=out_w,
        thinking_mask=thinking_mask,
        completion_mask=completion_mask,
        forced_mask=forced_mask,
        logprobs=logprobs,
        closed=closed,
    )
