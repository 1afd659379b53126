"""The static-cache decode engine: a preallocated KV cache of fixed shape, and a compiled decode step (CUDA graphs on
a GPU) that decodes into it. `multiplex_generate(cache_implementation="static", compile=...)` uses these; the default
eager loop (a DynamicCache) needs none of it."""

from __future__ import annotations

import weakref

import torch
from transformers import AutoConfig, StaticCache
from transformers.cache_utils import (
    LinearAttentionCacheLayerMixin,
    StaticLayer,
    StaticSlidingWindowLayer,
    get_layer_types_and_kwargs,
)

from .sampling import decode_step


CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")
STATIC_CACHE_BUCKET = 256  # static caches are sized in multiples of this, so prompt lengths share compiled steps


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
        if key_states.dtype != value_states.dtype:  # per layer and step: no work unless they differ
            dtype = torch.promote_types(key_states.dtype, value_states.dtype)
            key_states, value_states = key_states.to(dtype), value_states.to(dtype)
        return super().update(key_states, value_states, *args, **kwargs)


def static_cache_length(config, length: int) -> int:
    """`length` positions rounded up to the cache bucket, within the model's positions and its shortest sliding window
    (a cache that fits in the window never slides)."""
    bucket = -(-length // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
    limits = [getattr(config.get_text_config(), "max_position_embeddings", None), sliding_window(config)]
    limit = min((x for x in limits if x is not None), default=None)
    return bucket if limit is None else max(length, min(bucket, limit))


def static_cache(config, length: int):
    """A StaticCache of a model with this `config` for at least `length` positions (bucketed), and its length.

    A sliding-window layer whose window spans the whole cache never slides, so it becomes a plain static layer: same
    keys, values and mask, without the Python position counter that would change a compiled step at every position.
    """
    bucket = static_cache_length(config, length)
    cache = OneDtypeStaticCache(config=config, max_cache_len=bucket)
    cache.layers = [
        StaticLayer(max_cache_len=bucket)
        if type(layer) is StaticSlidingWindowLayer and layer.max_cache_len >= bucket
        else layer
        for layer in cache.layers
    ]
    return cache, bucket


def has_recurrent_layers(cache) -> bool:
    """Whether a cache holds the states of recurrent layers (mamba, short convolutions, linear attention)."""
    return any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in cache.layers)


def check_static_attention(config) -> None:
    """One-line error for attention that the static cache decodes wrongly: GPT-Neo's local layers cut their window
    at the cache's length, not at the position (the default loop's cache is as long as the text: exact)."""
    if "local" in (getattr(config.get_text_config(), "attention_layers", None) or []):
        raise ValueError(
            "cache_implementation='static' cannot decode this model: its local attention layers (attention_layers "
            "'local', GPT-Neo) would place their window at the end of the cache instead of at the position, and "
            "sample from another distribution: use the default decode loop (no cache_implementation='static')."
        )


def check_decode_model(config, cache_implementation: str | None, compile: bool, length: int) -> None:
    """What a model's `config` refuses of the decode-loop options, for `length` positions (builds no tensors)."""
    if cache_implementation == "static":
        check_static_attention(config)
    if compile:
        check_compiled_window(config, length)


def check_saved_model(path: str, cache_implementation: str | None, compile: bool, length: int, **config_kwargs):
    """`check_decode_model` against the config saved at `path` (a folder or Hub name; `config_kwargs` go to
    `AutoConfig.from_pretrained`), before any model loads. An unreadable config passes: loading the model reports it,
    and the rollout checks the model itself."""
    if cache_implementation != "static":
        return
    try:
        config = AutoConfig.from_pretrained(path, **config_kwargs)
    except (OSError, ValueError):
        return
    check_decode_model(config, cache_implementation, compile, length)


def check_compiled_window(config, length: int) -> None:
    """One-line error when a compiled step would decode `length` positions into a cache that slides (it would
    recompile at every position). Builds no tensors."""
    cache, _ = static_cache(config, length)
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        window = sliding_window(config)
        raise ValueError(
            f"A compiled decode step needs a KV cache that never slides, but the model's sliding window ({window}) is "
            f"shorter than prompt + completion ({length} positions), so the step would recompile at every position: "
            f"turn compilation off (multiplex_compile=False, or no --compile; the static cache alone handles sliding "
            f"windows) or keep prompt + completion within {window} positions."
        )


class CompiledDecode:
    """A model's decode step compiled by `torch.compile` (CUDA graphs on a GPU), and the static KV cache it decodes
    into. The step is `sampling.decode_step`: the merge of the slots' embeddings, the forward, and the temperature
    and top-k / top-p / min-p filters of the next position's logits, so the loop runs only the draw, the embedding
    lookup and their bookkeeping eagerly.

    The cache is kept between rollouts and reset in place: a CUDA graph replays on the addresses it was recorded with,
    so a new cache every rollout would record the graphs again every rollout (and torch keeps every recording,
    checking them all at each step). It only grows: a rollout that needs fewer positions than the kept cache decodes
    into it (the extra positions are masked), so prompts of varying lengths neither recompile nor re-record; a longer
    one replaces it, and so does another batch size or a rollout under `torch.inference_mode` (its cache holds
    inference tensors, which no rollout outside it may write). The price is the cache's memory, held between rollouts.
    A deep copy of the model (another policy) carries neither step nor cache: it compiles its own.
    """

    def __init__(self, model):
        self.on_gpu = next(model.parameters()).device.type == "cuda"
        mode = "reduce-overhead" if self.on_gpu else None
        # The model is an argument, not a closure: dynamo then guards on its structure (its weights are graph inputs),
        # so models of one architecture share graphs, as a compiled `model.__call__` would, instead of each adding
        # an entry towards torch's recompile limit for this one function.
        self.model_ref = weakref.ref(model)
        self.step = torch.compile(decode_step, fullgraph=False, dynamic=False, mode=mode)
        self.cache, self.cache_key, self.cache_len = None, None, 0

    def __call__(self, slot_embeds, weights, **kwargs):
        """`sampling.decode_step` for this model, compiled; its outputs are valid until the next call."""
        if self.on_gpu:  # each call starts a new CUDA-graph step; outputs of the previous one are already consumed
            torch.compiler.cudagraph_mark_step_begin()
        return self.step(self.model_ref(), slot_embeds, weights, **kwargs)

    def cache_for(self, model, batch: int, length: int):
        """The kept cache, emptied, when it holds `batch` rows of `length` positions; else a new one, at least as
        long as the one it replaces. Returns (cache, its length)."""
        param = next(model.parameters())
        device_type = param.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        # A cache made under torch.inference_mode holds inference tensors, which cannot be updated outside it.
        key = (batch, param.device, param.dtype, autocast, torch.is_inference_mode_enabled())
        if key == self.cache_key and length <= self.cache_len:
            self.cache.reset()
            return self.cache, self.cache_len
        check_compiled_window(model.config, length)
        length = max(length, self.cache_len) if key == self.cache_key else length
        self.cache = self.cache_key = None  # free the old cache before allocating the next
        self.cache, self.cache_len = static_cache(model.config, length)
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
