"""One thinking step: filter the policy, draw K slots with a mixer, merge their embeddings, decode the next position
(README: The method in one screen)."""

from __future__ import annotations

import torch

from .mixers import MERGES, Mixer, Multiplex, merge_weights  # noqa: F401  (re-exported: the merge rule)


def filter_logits(
    logits: torch.Tensor, *, top_k: int | None = None, top_p: float = 1.0, min_p: float | None = None
) -> torch.Tensor:
    """Mask filtered-out tokens with -inf, in the order transformers applies its warpers: top-k, top-p, min-p.

    `logits` are already divided by the temperature. Filters at their neutral value are skipped (no sort).
    """
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    if min_p is not None and min_p > 0.0:
        probs = logits.softmax(dim=-1)
        threshold = min_p * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def draw_slots(
    logits: torch.Tensor,
    *,
    width: int,
    merge: str = "weighted",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
    mixer: Mixer | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw the K slots of one position from raw logits [B, V] with `mixer` (default: multiplex, `merge`).

    Returns `ids` [B, K] (slot 0 is the representative token), merge `weights` [B, K] and `logps` [B, K], the
    log-probability of each slot under the full temperature softmax (the quantity the log-likelihood sums).
    """
    mixer = mixer or Multiplex(width, merge)
    filtered, full_logprobs = prepare_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ids, weights = mixer.draw(filtered, full_logprobs, generator)
    return ids, weights, full_logprobs.gather(-1, ids)


def prepare_logits(logits, *, temperature, top_k=None, top_p=1.0, min_p=None):
    """Raw logits [B, V] -> (filtered temperature-scaled logits, full temperature log-softmax), both float32."""
    scaled = logits.float() / temperature
    return filter_logits(scaled, top_k=top_k, top_p=top_p, min_p=min_p), scaled.log_softmax(dim=-1)


def decode_step(model, slot_embeds, weights, *, attention_mask, position_ids, cache, sampling: dict):
    """One decode step after a position's K slots are drawn: merge their embeddings [B, K, H] with `weights` [B, K],
    run the model on the KV cache, and prepare the next position's logits for the draw (`prepare_logits` with the
    `sampling` options).

    Deterministic from end to end, so the compiled decode step compiles all of it (static_decode.CompiledDecode). The
    embedding lookup stays outside, with the draw: it runs the embedding module's own hooks and adapters.
    """
    embeds = merge_slot_embeddings(slot_embeds, weights).unsqueeze(1)
    out = model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
    )
    return prepare_logits(out.logits[:, -1], **sampling)


def merge_slot_embeddings(slot_embeds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[..., K, H] slot embeddings and [..., K] weights -> [..., H].

    The sum runs in float32 and is cast once, so one-hot rows ([1, 0, ...]) give exactly E[k_0]. Both the rollout and
    the training forward merge through here, so the two see bit-identical inputs.
    """
    merged = (slot_embeds.float() * weights.float().unsqueeze(-1)).sum(dim=-2)
    return merged.to(slot_embeds.dtype)
