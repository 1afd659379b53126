"""One multiplex step: draw K slots from the policy and merge their embeddings (METHOD.md section 1)."""

from __future__ import annotations

import torch


MERGES = ("weighted", "averaged")


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw `width` tokens i.i.d. with replacement from the filtered policy and weigh them.

    Returns `ids` [B, K] in draw order (slot 0 first), merge `weights` [B, K] and `logps` [B, K], the log-probability of
    each draw under the full temperature softmax (the quantity the factorised log-likelihood sums).
    """
    scaled = logits.float() / temperature  # [B, V]
    full_logprobs = scaled.log_softmax(dim=-1)
    filtered = filter_logits(scaled, top_k=top_k, top_p=top_p, min_p=min_p)
    probs = filtered.softmax(dim=-1)
    ids = torch.multinomial(probs, width, replacement=True, generator=generator)  # [B, K]
    logps = full_logprobs.gather(-1, ids)  # [B, K]
    return ids, merge_weights(logps, merge), logps


def merge_weights(logps: torch.Tensor, merge: str) -> torch.Tensor:
    """Weights of the K slots: p(k_j) / sum_l p(k_l) over slots, duplicates counted in their own slots, or 1/K."""
    if merge == "weighted":
        # softmax over slots of log p == p_j / sum_l p_l, computed stably; the filter's normaliser cancels.
        return logps.softmax(dim=-1)
    if merge == "averaged":
        return torch.full_like(logps, 1.0 / logps.size(-1))
    raise ValueError(f"multiplex_merge must be one of {MERGES}, got {merge!r}.")


def merge_embeddings(embedding: torch.nn.Module, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """c = sum_j w_j E[k_j]: `ids`/`weights` [..., K] -> embeddings [..., H] in the embedding's dtype.

    The sum runs in float32 and is cast once, so one-hot rows ([1, 0, ...]) give exactly E[k_0]. Used by both the
    rollout and the training forward, so the two see bit-identical inputs.
    """
    emb = embedding(ids)  # [..., K, H]
    merged = (emb.float() * weights.float().unsqueeze(-1)).sum(dim=-2)
    return merged.to(emb.dtype)
