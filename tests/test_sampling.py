import pytest
import torch
from conftest import chat_batch
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from multiplex_trl.sampling import draw_slots, filter_logits, merge_slot_embeddings, merge_weights


def test_weighted_merge_counts_duplicates_in_their_own_slots():
    p = torch.tensor([0.5, 0.3, 0.2])
    logps = p.log()[[0, 0, 1]].unsqueeze(0)  # draws [a, a, b]
    w = merge_weights(logps, "weighted")[0]
    expected_a = 0.5 / (2 * 0.5 + 0.3)
    torch.testing.assert_close(w, torch.tensor([expected_a, expected_a, 0.3 / 1.3]))
    assert w[:2].sum() == pytest.approx(2 * 0.5 / (2 * 0.5 + 0.3))  # a gets twice the weight of one draw
    assert w.sum() == pytest.approx(1.0)


def test_averaged_merge_is_uniform():
    w = merge_weights(torch.randn(4, 3), "averaged")
    torch.testing.assert_close(w, torch.full((4, 3), 1 / 3))


def test_unknown_merge_is_refused():
    with pytest.raises(ValueError, match="multiplex_merge must be one of"):
        merge_weights(torch.zeros(1, 2), "max")


@pytest.mark.parametrize(
    "top_k,top_p,min_p", [(5, 1.0, None), (0, 0.8, None), (10, 0.9, 0.05), (0, 1.0, 0.1), (0, 0.0, None)]
)  # top_p=0 keeps the most likely token only (greedy), as transformers does
def test_filter_matches_transformers_warpers(top_k, top_p, min_p):
    torch.manual_seed(0)
    scores = torch.randn(6, 50) * 3
    expected = scores.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    if min_p:
        expected = MinPLogitsWarper(min_p)(None, expected)
    ours = filter_logits(scores, top_k=top_k, top_p=top_p, min_p=min_p)
    assert torch.equal(ours.isinf(), expected.isinf())
    torch.testing.assert_close(ours[~ours.isinf()], expected[~expected.isinf()])


def test_draws_are_iid_with_replacement_and_weights_use_full_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(20000, 1)
    temperature = 0.7
    g = torch.Generator().manual_seed(1)
    ids, weights, logps = draw_slots(logits, width=3, temperature=temperature, top_k=3, generator=g)
    assert ids.shape == (20000, 3)
    full = (logits[0] / temperature).log_softmax(-1)
    torch.testing.assert_close(logps, full[ids])  # full temperature softmax, not the filtered one
    p = full.exp()[ids]
    torch.testing.assert_close(weights, p / p.sum(-1, keepdim=True))
    assert ids.max() < 3  # top-k filter applied
    # with replacement: duplicates occur at the rate independence predicts
    q = (logits[0, :3] / temperature).softmax(-1)
    p_all_equal = (q**3).sum().item()
    observed = (ids == ids[:, :1]).all(-1).float().mean().item()
    assert observed == pytest.approx(p_all_equal, abs=0.015)
    # every slot (not just slot 0) follows the filtered distribution, independently of slot 0
    for slot in range(3):
        freq = torch.bincount(ids[:, slot], minlength=5)[:3].float() / len(ids)
        torch.testing.assert_close(freq, q, atol=0.015, rtol=0)
    joint = ((ids[:, 0] == 0) & (ids[:, 1] == 0)).float().mean().item()
    assert joint == pytest.approx(q[0].item() ** 2, abs=0.015)


def test_slot0_follows_filtered_distribution_chi_square():
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    n = 30000
    g = torch.Generator().manual_seed(3)
    ids, _, _ = draw_slots(logits.repeat(n, 1), width=3, temperature=1.3, top_p=0.9, generator=g)
    filtered = filter_logits(logits[0] / 1.3, top_p=0.9)
    q = filtered.softmax(-1)
    counts = torch.bincount(ids[:, 0], minlength=12).float()
    assert counts[q == 0].sum() == 0  # nothing outside the nucleus
    support = q > 0
    expected = q[support] * n
    chi2 = (((counts[support] - expected) ** 2) / expected).sum().item()
    dof = int(support.sum()) - 1
    # 99.9% quantile of chi-square with <= 11 dof is < 32
    assert chi2 < 32, (chi2, dof)


def test_merge_embeddings_one_hot_is_exact_and_weighted_sum(tok, model):
    emb = model.get_input_embeddings()
    ids = torch.tensor([[[7, 0, 0], [7, 9, 11]]])
    weights = torch.tensor([[[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]])
    out = merge_slot_embeddings(emb(ids), weights)
    assert torch.equal(out[0, 0], emb.weight[7])
    expected = 0.2 * emb.weight[7] + 0.3 * emb.weight[9] + 0.5 * emb.weight[11]
    torch.testing.assert_close(out[0, 1], expected)


def test_width_one_matches_model_generate_sampling(tok, model):
    """K=1 first-token sampling has the same distribution as `model.generate(do_sample=True)`."""
    from multiplex_trl.rollout import multiplex_generate

    input_ids, mask = chat_batch(tok, ["hello"])
    n = 4000
    input_ids, mask = input_ids.repeat(n, 1), mask.repeat(n, 1)
    kwargs = {"temperature": 0.8, "top_k": 20, "top_p": 0.95}
    torch.manual_seed(0)
    ref = model.generate(input_ids, attention_mask=mask, do_sample=True, max_new_tokens=1, **kwargs)[:, -1]
    r = multiplex_generate(
        model,
        input_ids,
        mask,
        width=1,
        max_new_tokens=1,
        thinking_end_ids=[4],
        eos_token_ids=[1],
        pad_token_id=0,
        generator=torch.Generator().manual_seed(1),
        **kwargs,
    )
    ours = r.ids[:, 0, 0]
    v = len(tok)
    f_ref = torch.bincount(ref, minlength=v).float() / n
    f_ours = torch.bincount(ours, minlength=v).float() / n
    logits = model(input_ids[:1], attention_mask=mask[:1]).logits[0, -1]
    from multiplex_trl.sampling import filter_logits as fl

    q = fl(logits / 0.8, top_k=20, top_p=0.95).softmax(-1)
    assert (f_ours[q == 0] == 0).all() and (f_ref[q == 0] == 0).all()
    torch.testing.assert_close(f_ours, q.detach(), atol=0.03, rtol=0)
    torch.testing.assert_close(f_ref, q.detach(), atol=0.03, rtol=0)
