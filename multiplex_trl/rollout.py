"""The multiplex rollout: a KV-cache decode loop with a thinking phase (K merged slots) and an answer phase."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer, get_layer_types_and_kwargs

from .mixers import Mixer, get_mixer
from .sampling import merge_embeddings, prepare_logits


CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")
STATIC_CACHE_BUCKET = 256  # static caches are sized in multiples of this, so prompt lengths share compiled steps
# The static loop asks the device "are all rows done?" only every this many steps, so the host can queue the next
# steps while the device works (finished rows cost nothing extra there: they stay in the fixed-shape batch anyway).
STATIC_STOP_CHECK_EVERY = 8


@dataclass
class MultiplexRollout:
    """What a rollout stores for every completion position t (METHOD.md section 3)."""

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
    max_thinking_tokens: int | None = None,
    generator: torch.Generator | None = None,
    mixer: Mixer | str = "multiplex",
    cache_implementation: str | None = None,
    compile: bool = False,
) -> MultiplexRollout:
    """Sample multiplex completions for left-padded prompts [B, P].

    Thinking phase: K draws per position, fed as their merged embedding, until the slot-0 stream completes the
    `thinking_end_ids` marker (or the budget forces it). Answer phase: one token per position. EOS in slot 0 ends a
    row; finished rows are dropped from the batch (and the KV cache) so they cost nothing.
    `mixer` swaps the multiplex draw for another token-mixing rule (a name or a `Mixer`, see `multiplex_trl.mixers`).

    `cache_implementation="static"` decodes with a preallocated KV cache and fixed shapes instead: finished rows
    stay in the batch (their positions are simply not stored), and the end check (a host sync) runs every
    `STATIC_STOP_CHECK_EVERY` steps. `compile=True` then runs each decode step's forward through `torch.compile`
    (CUDA graphs on a GPU). Both give the same rollout as the default loop up to floating-point rounding
    (tests/test_fast_decode.py).
    """
    check_decode_options(cache_implementation, compile)
    static = cache_implementation == "static"
    if isinstance(mixer, str):
        mixer = get_mixer(mixer, width, **({"merge": merge} if mixer == "multiplex" else {}))
    # Per-slot log-prob coefficients at mixed positions: the method's likelihood, or a plain sum if it has none.
    coefficients = mixer.slot_coefficients if mixer.trainable else torch.ones_like
    cold_stop = mixer.cold_stop_entropy
    device = input_ids.device
    batch, k = input_ids.size(0), width
    marker = torch.tensor(thinking_end_ids, device=device)  # [L]
    eos = torch.tensor(eos_token_ids, device=device)
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
    recent = torch.full((batch, marker.numel()), -1, dtype=torch.long, device=device)  # last slot-0 ids
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
    merged_at, forced_at, closes_at, valid_at = torch.zeros(
        (4, max_new_tokens, batch), dtype=torch.bool, device=device
    )

    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    decode, cache, alive = model, None, None
    if static:  # one cache of a bucketed length for the whole rollout; the mask spans it at every step
        if compile:  # the compiled step decodes into a cache it keeps (fixed addresses for CUDA graphs)
            decode = compiled_decode_step(model)
            cache, cache_len = decode.static_cache(model, batch, prompt_len + max_new_tokens)
        else:
            cache, cache_len = _static_cache(model, prompt_len + max_new_tokens)
        mask = torch.cat([mask, mask.new_zeros(batch, cache_len - mask.size(1))], dim=-1)
        alive = torch.ones(batch, dtype=torch.bool, device=device)
    out = model(
        input_ids=input_ids,
        attention_mask=mask if static else attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache, logits = out.past_key_values, out.logits[:, -1]

    for t in range(max_new_tokens):
        filtered, full_logprobs = prepare_logits(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p
        )
        ids, weights = mixer.draw(filtered, full_logprobs, generator)  # [b, K]
        forced = None
        if may_force:  # budget reached, or confident for long enough (cold stop): force the marker from here on
            stop = thought >= max_thinking_tokens if max_thinking_tokens is not None else torch.zeros_like(thinking)
            if cold_stop is not None:
                entropy = torch.special.entr(filtered.softmax(-1)).sum(-1)
                cold = torch.where(thinking & (entropy < cold_stop), cold + 1, 0)
                stop = stop | (cold >= mixer.cold_stop_steps)
            forcing = torch.where(thinking & (forcing < 0) & stop, 0, forcing)
            forced = forcing >= 0
            forced_tok = marker[forcing.clamp(min=0, max=marker.numel() - 1)]
            ids = torch.where(forced.unsqueeze(-1), forced_tok.unsqueeze(-1), ids)
        logps = full_logprobs.gather(-1, ids)
        slot0 = ids[:, 0]
        if marker.numel() == 1:
            closes = thinking & (slot0 == marker[0])
        else:  # match the marker's token sequence on the slot-0 stream
            recent = torch.cat([recent[:, 1:], slot0.unsqueeze(-1)], dim=-1)
            closes = thinking & ((recent == marker).all(-1) | (forcing == marker.numel() - 1))
        ends = torch.isin(slot0, eos)
        merged = thinking & ~closes & ~ends  # thinking rows that neither close thinking nor end here
        if forced is not None:
            ends = ends & ~forced
            merged = merged & ~forced
            forcing = torch.where(forced, forcing + 1, forcing)
            forcing = torch.where(forcing >= marker.numel(), -1, forcing)
        # Everything but a merged position is stored and fed one-hot: [tok, pad, ...] with weights [1, 0, ...].
        weights = torch.where(merged.unsqueeze(-1), weights, one_hot)
        ids = ids.masked_fill(~merged.unsqueeze(-1) & slot_is_pad, pad_token_id)
        step_logp = torch.where(merged, (coefficients(weights) * logps).sum(-1), logps[:, 0])
        rec_ids[t, rows], rec_w[t, rows], rec_logp[t, rows] = ids, weights, step_logp
        merged_at[t, rows], closes_at[t, rows] = merged, closes
        if forced is not None:
            forced_at[t, rows] = forced
        valid_at[t, rows] = alive if static else True  # static: finished rows stay in the batch, not in the rollout
        thought = thought + merged
        thinking = thinking & ~closes

        if t == max_new_tokens - 1:
            break
        if static:  # fixed shapes: finished rows stay and are masked out of the records
            alive = alive & ~ends
            if (t + 1) % STATIC_STOP_CHECK_EVERY == 0 and not bool(alive.any()):  # a host sync every few steps
                break
            n_done = 0
        else:
            n_done = int(ends.sum())  # the one host sync per step
            if n_done == rows.numel():
                break
        if n_done:
            keep = (~ends).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, mask, position, thinking, thought, forcing, recent, cold, ids, weights = (
                x[keep] for x in (rows, mask, position, thinking, thought, forcing, recent, cold, ids, weights)
            )

        out = decode(
            inputs_embeds=merge_embeddings(embed, ids, weights).unsqueeze(1),
            attention_mask=mask if static else mask[:, : prompt_len + t + 1],
            position_ids=position.unsqueeze(-1),
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1].clone() if decode is not model else out.logits[:, -1]
        position = position + 1

    # [T, B, ...] -> [B, T, ...]; static: drop the steps decoded after the last row finished (checked every few steps).
    length = int(valid_at.any(-1).nonzero().max()) + 1 if static else t + 1

    def batch_major(records):
        return records[:length].transpose(0, 1).contiguous()

    completion_mask = batch_major(valid_at)
    real = completion_mask.unsqueeze(-1)
    out_ids = batch_major(rec_ids).masked_fill_(~real, pad_token_id)
    out_w = batch_major(rec_w).masked_fill_(~real, 0.0)
    logprobs = batch_major(rec_logp).masked_fill_(~completion_mask, 0.0)
    thinking_mask = batch_major(merged_at) & completion_mask
    forced_mask = batch_major(forced_at) & completion_mask
    closed = (batch_major(closes_at) & completion_mask).any(-1)
    return MultiplexRollout(
        ids=out_ids,
        weights=out_w,
        thinking_mask=thinking_mask,
        completion_mask=completion_mask,
        forced_mask=forced_mask,
        logprobs=logprobs,
        closed=closed,
    )


def check_decode_options(cache_implementation: str | None, compile: bool) -> None:
    """One-line errors for the decode-loop options (raised before anything runs)."""
    if cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"cache_implementation must be one of {list(CACHE_IMPLEMENTATIONS)} for the multiplex rollout, "
            f"got {cache_implementation!r}."
        )
    if compile and cache_implementation != "static":
        raise ValueError(
            "A compiled decode step needs fixed shapes: set cache_implementation='static' with compile "
            "(multiplex_compile in a config, --compile on the command line)."
        )


def sliding_window(config) -> int | None:
    """The shortest sliding (or chunked) attention window among the model's layers; None if every layer sees all."""
    _, per_layer = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    windows = [kw["sliding_window"] for kw in per_layer if kw.get("sliding_window") is not None]
    return min(windows, default=None)


class OneDtypeStaticCache(StaticCache):
    """A StaticCache that stores keys and values in one dtype, the wider of the two.

    Under autocast (bf16 mixed precision with float32 weights, where accelerate runs the forward under autocast) RoPE
    leaves the keys in float32 while the values come out of a bf16 projection, and a static layer holds both in the
    keys' dtype (transformers' own StaticCache then fails in index_copy_). Widening the values is exact.
    """

    def update(self, key_states, value_states, *args, **kwargs):
        dtype = torch.promote_types(key_states.dtype, value_states.dtype)
        return super().update(key_states.to(dtype), value_states.to(dtype), *args, **kwargs)


def static_cache_length(model, length: int) -> int:
    """`length` positions rounded up to the cache bucket, within the model's positions and its shortest sliding window
    (a cache that fits in the window never slides)."""
    bucket = -(-length // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
    limits = [getattr(model.config.get_text_config(), "max_position_embeddings", None), sliding_window(model.config)]
    limit = min((x for x in limits if x is not None), default=None)
    return bucket if limit is None else max(length, min(bucket, limit))


def _static_cache(model, length: int):
    """A StaticCache for at least `length` positions (bucketed), and its length.

    A sliding-window layer whose window spans the whole cache never slides, so it becomes a plain static layer: same
    keys, values and mask, without the Python position counter that would change a compiled step at every position.
    """
    bucket = static_cache_length(model, length)
    cache = OneDtypeStaticCache(config=model.config, max_cache_len=bucket)
    cache.layers = [
        StaticLayer(max_cache_len=bucket)
        if type(layer) is StaticSlidingWindowLayer and layer.max_cache_len >= bucket
        else layer
        for layer in cache.layers
    ]
    return cache, bucket


def check_compiled_window(model, length: int) -> None:
    """One-line error when a compiled step would decode `length` positions into a cache that slides (it would
    recompile at every position). Builds no tensors."""
    cache, _ = _static_cache(model, length)
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        window = sliding_window(model.config)
        raise ValueError(
            f"multiplex_compile needs a KV cache that never slides, but the model's sliding window ({window}) is "
            f"shorter than prompt + completion ({length} positions), so the compiled step would recompile at every "
            f"position: set multiplex_compile=False (cache_implementation='static' alone handles sliding windows) "
            f"or keep prompt + max_completion_length <= {window}."
        )


class CompiledDecode:
    """A model's decode step compiled by `torch.compile` (CUDA graphs on a GPU), and the static KV cache it decodes
    into.

    The cache is kept between rollouts and reset in place: a CUDA graph replays on the addresses it was recorded with,
    so a new cache every rollout would record the graphs again every rollout (and torch keeps every recording,
    checking them all at each step). It only grows: a rollout that needs fewer positions than the kept cache decodes
    into it (the extra positions are masked), so prompts of varying lengths neither recompile nor re-record; a longer
    one replaces it, and so does another batch size. The price is the cache's memory, held between rollouts.
    A deep copy of the model (another policy) carries neither step nor cache: it compiles its own.
    """

    def __init__(self, model):
        self.on_gpu = next(model.parameters()).device.type == "cuda"
        mode = "reduce-overhead" if self.on_gpu else None
        self.step = torch.compile(model.__call__, fullgraph=False, dynamic=False, mode=mode)
        self.cache, self.cache_key, self.cache_len = None, None, 0

    def __call__(self, **kwargs):
        if self.on_gpu:  # each call starts a new CUDA-graph step; outputs of the previous one are already consumed
            torch.compiler.cudagraph_mark_step_begin()
        return self.step(**kwargs)

    def static_cache(self, model, batch: int, length: int):
        """The kept cache, emptied, when it holds `batch` rows of `length` positions; else a new one, at least as
        long as the one it replaces. Returns (cache, its length)."""
        param = next(model.parameters())
        device_type = param.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        key = (batch, param.device, param.dtype, autocast)
        if key == self.cache_key and length <= self.cache_len:
            self.cache.reset()
            return self.cache, self.cache_len
        check_compiled_window(model, length)
        length = max(length, self.cache_len) if key == self.cache_key else length
        self.cache = self.cache_key = None  # free the old cache before allocating the next
        self.cache, self.cache_len = _static_cache(model, length)
        self.cache_key = key
        return self.cache, self.cache_len

    def __deepcopy__(self, memo):
        return None  # a copied model compiles its own step, bound to its own weights


def compiled_decode_step(model) -> CompiledDecode:
    """The model's `CompiledDecode`, made on first use (and again for a copy of the model)."""
    compiled = model.__dict__.get("_multiplex_compiled_decode")
    if compiled is None:
        compiled = model.__dict__["_multiplex_compiled_decode"] = CompiledDecode(model)
    return compiled
