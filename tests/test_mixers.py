import pytest
import torch
from conftest import RowScript, Scripted, Steered, chat_batch, generate_rollout, recompute

from multiplex_trl import MultiplexGRPOConfig
from multiplex_trl.mixers import MIXERS, Mixer, get_mixer
from multiplex_trl.rollout import multiplex_generate
from multiplex_trl.sampling import draw_slots


LOGITS = torch.tensor([[2.0, 1.5, 0.5, 0.0, -1.0, -2.0]])


def _draw(name, n=20000, width=3, seed=0, **params):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    return draw_slots(LOGITS.repeat(n, 1), width=width, mixer=get_mixer(name, width, **params), generator=g)


def _topk_p(width=3):
    p = LOGITS[0].softmax(-1)[:width]
    return p / p.sum()


def test_registry_names_and_unknown_mixer():
    assert set(MIXERS) == {"multiplex", "soft", "gumbel", "dirichlet", "mot_distinct"}
    with pytest.raises(ValueError, match=r"mixer must be one of \['dirichlet', 'gumbel', 'mot_distinct'"):
        get_mixer("coconut")


def test_soft_is_the_deterministic_renormalised_top_k():
    ids, weights, _ = _draw("soft", n=3)
    assert ids.tolist() == [[0, 1, 2]] * 3  # slot 0 is the top-1 token
    torch.testing.assert_close(weights, _topk_p().expand(3, 3))


def test_gumbel_weights_follow_gumbel_softmax_and_representative_is_a_draw():
    ids, weights, _ = _draw("gumbel", gumbel_tau=0.5)
    assert torch.allclose(weights.sum(-1), torch.ones(len(weights)))
    assert (weights[:, 0] >= weights[:, 1:].max(-1).values).all()  # slot 0 holds the top-1 of the noisy weights
    # Gumbel-max: the argmax of (log p + g) / tau is distributed as p (over the top-k), whatever tau
    freq = torch.bincount(ids[:, 0], minlength=6)[:3].float() / len(ids)
    torch.testing.assert_close(freq, _topk_p(), atol=0.015, rtol=0)
    # smaller tau -> sharper weights
    _, sharp, _ = _draw("gumbel", gumbel_tau=0.1)
    assert sharp[:, 0].mean() > weights[:, 0].mean()


def test_dirichlet_weights_have_mean_p():
    ids, weights, _ = _draw("dirichlet", dirichlet_gamma=4.0)
    p = _topk_p()
    per_token = torch.zeros(len(ids), 6).scatter(1, ids, weights)[:, :3]
    torch.testing.assert_close(per_token.mean(0), p, atol=0.01, rtol=0)  # E[w_i] = gamma p_i / gamma = p_i
    # gamma is the concentration: Var[w_i] = p_i (1 - p_i) / (gamma + 1)
    torch.testing.assert_close(per_token.var(0), p * (1 - p) / 5, atol=0, rtol=0.05)
    assert (weights[:, 0] >= weights[:, 1:].max(-1).values).all()


def test_mot_distinct_draws_without_replacement():
    ids, weights, logps = _draw("mot_distinct")
    assert all(len(set(row)) == 3 for row in ids.tolist())
    p = logps.exp()
    torch.testing.assert_close(weights, p / p.sum(-1, keepdim=True))
    freq = torch.bincount(ids[:, 0], minlength=6).float() / len(ids)  # first draw ~ pi
    torch.testing.assert_close(freq, LOGITS[0].softmax(-1), atol=0.015, rtol=0)


def test_mot_distinct_with_a_filter_narrower_than_k():
    g = torch.Generator().manual_seed(0)
    ids, weights, _ = draw_slots(
        LOGITS.repeat(50, 1), width=3, top_k=2, mixer=get_mixer("mot_distinct", 3), generator=g
    )
    assert (weights[:, 2] == 0).all() and torch.allclose(weights.sum(-1), torch.ones(50))
    assert set(ids[:, :2].flatten().tolist()) <= {0, 1}


def test_soft_stops_when_top1_is_the_marker_and_cold_stop_forces_it(tok, model):
    marker, a, b = tok.convert_tokens_to_ids("</think>"), 17, 18
    input_ids, mask = chat_batch(tok, ["q"])

    def bias(step):
        v = torch.full((len(tok),), -1e4)
        if step < 3:
            v[a], v[b] = 1e4, 1e4 - 0.5  # flat enough: high entropy
        else:
            v[marker], v[a] = 1e4, 1e4 - 1.0  # marker is top-1
        return v

    r = multiplex_generate(
        Steered(model, bias),
        input_ids,
        mask,
        width=2,
        mixer="soft",
        max_new_tokens=6,
        thinking_end_ids=[marker],
        eos_token_ids=[1],
        pad_token_id=0,
    )
    assert r.thinking_mask[0, :3].all() and not r.thinking_mask[0, 3]
    assert r.ids[0, 3, 0] == marker and r.closed.all()

    # Cold stop: a near one-hot distribution (entropy < 0.01) for 4 steps forces the marker.
    sharp = Steered(model, lambda s: torch.where(torch.arange(len(tok)) == a, 1e4, -1e4))
    soft = get_mixer("soft", 2, cold_stop_entropy=0.01, cold_stop_steps=4)
    r = multiplex_generate(
        sharp,
        input_ids,
        mask,
        width=2,
        mixer=soft,
        max_new_tokens=8,
        thinking_end_ids=[marker],
        eos_token_ids=[1],
        pad_token_id=0,
    )
    assert r.thinking_mask[0].sum() == 3  # the 4th low-entropy position is where the marker is forced
    assert r.ids[0, 3, 0] == marker and r.forced_mask[0, 3]


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_cold_stop_counts_consecutive_low_entropy_positions_of_each_row(tok, model, cache_implementation):
    """The cold stop needs `cold_stop_steps` low-entropy positions in a row: a confident stretch broken by one flat
    position starts the count again. Each row counts its own, also after another row has left the batch."""
    marker, a, b = tok.convert_tokens_to_ids("</think>"), 17, 18

    def script(row, step):  # row 0: ends at step 1; row 1: confident but at step 3, so the 4th in a row is step 7
        if row == 0:
            return a if step == 0 else 1
        return {a: 0.0, b: 0.0} if step == 3 else a

    soft = get_mixer("soft", 2, cold_stop_entropy=0.01, cold_stop_steps=4)
    r, _, _ = generate_rollout(
        RowScript(model, len(tok), 2, script), tok, ["x", "y"], width=2, mixer=soft, max_new_tokens=10,
        cache_implementation=cache_implementation,
    )  # fmt: skip
    assert r.lengths() == [2, 10] and r.closed.tolist() == [False, True]
    assert r.thinking_mask[1].tolist() == [True] * 7 + [False] * 3
    assert r.forced_mask[1].nonzero().flatten().tolist() == [7] and r.ids[1, 7, 0] == marker


@pytest.mark.parametrize("name", ["dirichlet", "mot_distinct", "multiplex"])
def test_trainable_mixers_recompute_their_rollout_logprobs(tok, model, name):
    input_ids, mask = chat_batch(tok, ["1+1?", "a longer question", "x"])
    torch.manual_seed(0)
    r = multiplex_generate(
        model,
        input_ids,
        mask,
        width=3,
        mixer=name,
        max_new_tokens=24,
        thinking_end_ids=[4],
        eos_token_ids=[1],
        pad_token_id=0,
        generator=torch.Generator().manual_seed(0),
        max_thinking_tokens=10,
        top_k=30,
    )
    lp = recompute(model, input_ids, mask, r, temperature=1.0, mixer=name)
    assert (lp - r.logprobs).abs().max().item() < 1e-5
    if name != "multiplex":  # MoT-G's sum_j w_j log pi(k_j): a weighted mean, so no larger than the best slot
        per_slot = recompute(model, input_ids, mask, r, temperature=1.0, mixer="multiplex")
        think = r.thinking_mask
        assert (lp[think] > per_slot[think]).all()  # all-K sum is more negative than a convex combination


@pytest.mark.parametrize("name,reason", [("soft", "deterministic"), ("gumbel", "no density")])
def test_untrainable_mixers_are_refused_for_grpo(name, reason):
    with pytest.raises(ValueError, match=f"mixer='{name}' cannot be trained: .*{reason}"):
        MultiplexGRPOConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, mixer=name)


def test_adding_a_mixer_is_one_subclass(tok, model):
    class Greedy(Mixer):
        name = "test_greedy"

        def draw(self, filtered, full_logprobs, generator):
            ids = filtered.argmax(-1, keepdim=True).expand(-1, self.width)
            return ids, torch.full(ids.shape, 1.0 / self.width)

    try:
        input_ids, mask = chat_batch(tok, ["q"])
        r = multiplex_generate(
            model,
            input_ids,
            mask,
            width=2,
            mixer="test_greedy",
            max_new_tokens=5,
            thinking_end_ids=[4],
            eos_token_ids=[1],
            pad_token_id=0,
        )
        greedy = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=5)[0, -5:]
        n = r.lengths()[0]
        assert r.completion_ids[0, :n].tolist() == greedy[:n].tolist()
    finally:
        MIXERS.pop("test_greedy")


@pytest.mark.parametrize("top_k", [None, 3], ids=["unfiltered", "top_k=3"])
@pytest.mark.parametrize("name", sorted(MIXERS))
def test_answer_phase_samples_the_policy_for_every_mixer(tok, model, name, top_k):
    """The method's answer phase: after the marker decoding is ordinary sampling of the filtered policy, whatever the thinking
    phase's mixer, and the stored log-prob is the full temperature softmax's, as the trainer recomputes it. Top-k
    mixers (soft, gumbel, dirichlet) used to take their slot 0 there: greedy, or never a token outside the top K."""
    marker = tok.convert_tokens_to_ids("</think>")
    toks = list(range(17, 22))
    pi = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.10])
    kept = pi if top_k is None else torch.cat([pi[:top_k] / pi[:top_k].sum(), torch.zeros(len(pi) - top_k)])

    def bias(step):  # step 0: the marker; step 1 (the first answer position): pi over five tokens
        v = torch.full((len(tok),), -1e4)
        if step == 0:
            v[marker] = 1e4
        else:
            v[toks] = pi.log()
        return v

    torch.manual_seed(0)
    r, _, _ = generate_rollout(Scripted(model, bias), tok, ["q"] * 4000, mixer=name, max_new_tokens=2, top_k=top_k)
    assert (r.ids[:, 0, 0] == marker).all() and not r.thinking_mask[:, 1].any()
    answer = r.ids[:, 1, 0]
    freq = torch.stack([(answer == t).float().mean() for t in toks])
    assert freq[kept == 0].sum() == 0  # nothing outside the filter
    assert 0.5 * (freq - kept).abs().sum().item() < 0.04, (name, freq.tolist())  # top-k answers: TV >= 0.2
    assert torch.allclose(r.logprobs[:, 1], pi.log()[answer - toks[0]], atol=1e-5)


@pytest.mark.parametrize("name", ["gumbel", "mot_distinct", "multiplex", "soft"])
def test_a_seeded_generator_fixes_the_rollout_whatever_the_global_rng(tok, model, name):
    """Every draw of these mixers (thinking slots, Gumbel noise, answer tokens) comes from `generator`."""
    rollouts = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        r, _, _ = generate_rollout(model, tok, ["1+1?", "x"], mixer=name, max_new_tokens=12, max_thinking_tokens=4)
        rollouts.append(r)
    first, second = rollouts
    assert torch.equal(first.ids, second.ids) and torch.equal(first.weights, second.weights), name
    assert (first.completion_mask & ~first.thinking_mask & ~first.forced_mask).any()  # answer positions too


def test_cold_stop_reads_the_policys_entropy_not_the_filtered_one(tok, model):
    """Soft Thinking's sampler measures the entropy of the temperature softmax before its top-k / top-p / min-p
    filters. A policy with 0.97 on one token and 0.03 spread over 30 others (entropy 0.24) is one-hot after top-p
    0.95: a filtered entropy of 0 would cold-stop a row whose policy is far above the 0.01 threshold."""
    a, tail = 17, list(range(20, 50))
    p = torch.zeros(len(tok))
    p[a], p[tail] = 0.97, 0.03 / len(tail)
    logits = torch.where(p > 0, p.clamp(min=1e-30).log(), torch.tensor(-1e4))
    soft = get_mixer("soft", 3, cold_stop_entropy=0.01, cold_stop_steps=4)
    r, _, _ = generate_rollout(Scripted(model, lambda s: logits), tok, ["q"], mixer=soft, max_new_tokens=8, top_p=0.95)
    assert not r.forced_mask.any() and r.thinking_mask[0].all()


@pytest.mark.parametrize("params", [{"cold_stop_steps": 0}, {"cold_stop_steps": -3}, {"cold_stop_entropy": -0.1}])
def test_soft_refuses_cold_stop_parameters_that_would_skip_thinking(params):
    """cold_stop_steps=0 made `cold >= 0` true at the first thinking position: every row was forced to the marker
    before thinking anything, whatever its entropy. The other mixers check their parameters; so does this one."""
    with pytest.raises(ValueError, match="cold_stop_"):
        get_mixer("soft", 3, **{"cold_stop_entropy": 0.01, **params})
