import pytest
import torch
from conftest import (
    RowScript,
    Scripted,
    Steered,
    check_text_marker_closes_where_written,
    generate_rollout,
    recompute,
)

from multiplex_trl.markers import marker_automaton
from multiplex_trl.rollout import STATIC_STOP_CHECK_EVERY, multiplex_generate
from multiplex_trl.testing import LoopOps, tiny_model, tiny_tokenizer


EOS, PAD = 1, 0


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _force(vocab, schedule):
    """bias(step): a large bias on the token named by schedule(step) (None: the model's own distribution)."""

    def bias(step):
        tok_id = schedule(step)
        if tok_id is None:
            return None
        b = torch.zeros(vocab)
        if isinstance(tok_id, dict):  # {token: logit} -> a scripted distribution over a few tokens
            b -= 1e4
            for t, v in tok_id.items():
                b[t] = v + 1e4
            return b
        b[tok_id] = 1e4
        return b

    return bias


def test_stop_rule_single_token_marker(tok, model):
    marker, a, b = tok.convert_tokens_to_ids("</think>"), _ids(tok, "a")[0], _ids(tok, "b")[0]
    # steps 0-2: two-way distribution (branching); step 3: marker; steps 4-5: answer 'b'; step 6: EOS
    sched = {0: {a: 0.0, b: 0.0}, 1: {a: 0.0, b: 0.0}, 2: {a: 0.0, b: 0.0}, 3: marker, 4: b, 5: b, 6: EOS}
    steered = Steered(model, _force(len(tok), lambda s: sched.get(s, EOS)))
    r, _, _ = generate_rollout(steered, tok, ["hi"])
    assert r.lengths() == [7]
    assert r.thinking_mask[0].tolist() == [True] * 3 + [False] * 4
    assert r.ids[0, 3].tolist() == [marker, PAD, PAD] and r.weights[0, 3].tolist() == [1.0, 0.0, 0.0]
    for t in (4, 5, 6):  # answer positions are one-hot
        assert r.ids[0, t, 1:].tolist() == [PAD, PAD] and r.weights[0, t].tolist() == [1.0, 0.0, 0.0]
    assert r.ids[0, 6, 0] == EOS and r.closed.tolist() == [True]
    for t in range(3):
        assert set(r.ids[0, t].tolist()) <= {a, b}
        assert r.weights[0, t].sum().item() == pytest.approx(1.0)


def test_marker_in_a_later_slot_is_merged_not_a_stop(tok, model):
    marker, a = tok.convert_tokens_to_ids("</think>"), _ids(tok, "a")[0]
    # 50/50 between 'a' and the marker: over many rows some positions draw the marker only in slots 1-2
    steered = Steered(model, _force(len(tok), lambda s: {a: 0.0, marker: 0.0}))
    r, _, _ = generate_rollout(steered, tok, ["q"] * 64, max_new_tokens=6)
    first_slot0_marker = (r.ids[..., 0] == marker).float().argmax(-1)
    for row in range(64):
        end = int(first_slot0_marker[row]) if (r.ids[row, :, 0] == marker).any() else r.ids.size(1)
        before = r.ids[row, :end]
        # positions before the first slot-0 marker are merged thinking positions, markers in slots 1+ included
        assert r.thinking_mask[row, :end].all()
        assert (before[:, 0] != marker).all()
    later_slot_marker = ((r.ids[..., 1:] == marker).any(-1) & r.thinking_mask).any()
    assert later_slot_marker, "the scripted distribution should put the marker in a later slot somewhere"


def test_multi_token_marker_matched_on_slot0_stream():
    tok = tiny_tokenizer(with_think_token=False)
    model = tiny_model(tok).eval()
    marker = _ids(tok, "</think>")
    assert len(marker) == 8
    seq = _ids(tok, "xy") + marker + _ids(tok, "42") + [EOS]
    steered = Steered(model, _force(len(tok), lambda s: seq[s] if s < len(seq) else EOS))
    r, _, _ = generate_rollout(steered, tok, ["q"])
    n_think = 2 + len(marker) - 1  # thinking ends with the marker's last token
    assert r.thinking_mask[0].tolist() == [True] * n_think + [False] * (len(seq) - n_think)
    assert r.ids[0, n_think].tolist() == [marker[-1], PAD, PAD]
    assert tok.decode(r.completion_ids[0, : len(seq)]) == "xy</think>42<eos>"


def test_multi_token_marker_is_matched_on_the_slot0_stream_of_branching_rows(tok, model):
    """With K draws that differ, only the slot-0 stream closes a multi-token marker: `a b` completed in slot 0 ends
    thinking with `b` (stored one-hot), `a b` across later slots is merged on. Rows end at different steps (EOS)."""
    a, b = _ids(tok, "a")[0], _ids(tok, "b")[0]
    steered = Steered(model, _force(len(tok), lambda s: {a: 0.0, b: 0.0, EOS: -2.5}))
    r, _, _ = generate_rollout(steered, tok, ["q"] * 64, thinking_end_ids=[a, b], max_new_tokens=8)
    lengths = r.lengths()
    assert min(lengths) < max(lengths) == 8
    later_slot_only = 0
    for row, length in enumerate(lengths):
        stream = r.ids[row, :length, 0].tolist()
        close = next((t for t in range(1, length) if stream[t - 1 : t + 1] == [a, b]), length)
        expected = [t < close and stream[t] != EOS for t in range(length)]
        assert r.thinking_mask[row, :length].tolist() == expected, (row, stream)
        assert r.closed[row].item() == (close < length)
        if close < length:
            assert r.ids[row, close].tolist() == [b, PAD, PAD] and r.weights[row, close].tolist() == [1.0, 0.0, 0.0]
        slots = r.ids[row, :close, 1:]
        later_slot_only += bool(((slots[:-1] == a) & (slots[1:] == b)).any())
    assert r.closed.any() and later_slot_only, "the marker should complete in later slots somewhere"


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_the_text_matcher_closes_thinking_where_the_text_first_writes_the_marker(tok, model, cache_implementation):
    """`thinking_end_automaton` (markers.py) closes thinking at the first slot-0 token whose text completes the marker,
    whichever tokens wrote it: the marker's own tokens, the marker after a space, merged with the text after it, or
    with a special token (no text) in between; a stream that never writes it thinks to its end."""
    a, b, c, d, e, s, x = (_ids(tok, ch)[0] for ch in "abcdesx")
    spelled = [b"?"] * len(tok)  # the text each token writes, for this test: the marker is "Ab:", its tokens [a, b]
    for token, text in {a: b"A", b: b"b:", c: b" A", d: b"Ab", e: b":**", s: b"", x: b"x"}.items():
        spelled[token] = text
    streams = {  # rows end in order
        0: [x, a, b, x, EOS],  # "xAb:": the marker's own tokens
        1: [x, c, b, x, EOS],  # "x Ab:": after a space
        2: [x, d, e, x, EOS],  # "xAb:**": its last token merged with the text after it
        3: [x, a, s, b, x, EOS],  # "xAb:": a token with no text in between
        4: [x, a, x, b, c, x, EOS],  # "xAxb: A": never written
    }

    def script(row, step):
        return streams[row][step] if step < len(streams[row]) else EOS

    r, _, _ = generate_rollout(
        RowScript(model, len(tok), 5, script), tok, list("vwxyz"), max_new_tokens=12, thinking_end_ids=[a, b],
        thinking_end_automaton=marker_automaton(b"Ab:", spelled), cache_implementation=cache_implementation,
    )  # fmt: skip
    assert r.lengths() == [5, 5, 5, 6, 7]
    assert r.closed.tolist() == [True, True, True, True, False]
    assert r.thinking_mask.sum(-1).tolist() == [2, 2, 2, 3, 6]  # the positions before the one that completes it
    for row, step, token in [(0, 2, b), (1, 2, b), (2, 2, e), (3, 3, b)]:
        assert r.ids[row, step].tolist() == [token, PAD, PAD] and r.weights[row, step].tolist() == [1.0, 0.0, 0.0]


def test_ids_past_the_matchers_table_keep_its_state(tok, model):
    """A model's vocabulary may be padded beyond the tokenizer's (the matcher's table): such an id writes no text, so
    `A`, <padded id>, `b:` still writes the marker "Ab:"."""
    a, b, x = (_ids(tok, ch)[0] for ch in "abx")
    beyond = len(tok) - 1
    spelled = [b"?"] * beyond
    spelled[a], spelled[b], spelled[x] = b"A", b"b:", b"x"
    stream = [x, a, beyond, b, x, EOS]
    steered = Steered(model, _force(len(tok), lambda s: stream[min(s, len(stream) - 1)]))
    r, _, _ = generate_rollout(
        steered, tok, ["q"], thinking_end_ids=[a, b], thinking_end_automaton=marker_automaton(b"Ab:", spelled)
    )
    assert r.closed.tolist() == [True] and r.thinking_mask[0].tolist() == [True] * 3 + [False] * 3


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_a_text_marker_closes_where_its_text_is_first_written(tok, cache_implementation):
    """On the model's own (steered) draws; tests/test_gpu.py runs the same check on CUDA."""
    check_text_marker_closes_where_written(tok, "cpu", cache_implementation)


def test_eos_in_slot0_while_thinking_ends_the_completion(tok, model):
    a = _ids(tok, "a")[0]
    steered = Steered(model, _force(len(tok), lambda s: a if s < 2 else EOS))
    r, _, _ = generate_rollout(steered, tok, ["q"])
    assert r.lengths() == [3]
    assert r.ids[0, 2].tolist() == [EOS, PAD, PAD] and not r.thinking_mask[0, 2]
    assert not r.closed[0]


def test_thinking_budget_forces_the_marker(tok, model):
    tok2 = tiny_tokenizer(with_think_token=False)
    model2 = tiny_model(tok2).eval()
    a = _ids(tok2, "a")[0]
    steered = Steered(model2, _force(len(tok2), lambda s: a))  # never closes, never ends
    r, _, _ = generate_rollout(steered, tok2, ["q", "longer question"], max_thinking_tokens=4, max_new_tokens=20)
    marker = _ids(tok2, "</think>")
    for row in range(2):
        assert r.thinking_mask[row].sum() == 4
        assert r.ids[row, 4 : 4 + len(marker), 0].tolist() == marker
        assert r.forced_mask[row].tolist() == [False] * 4 + [True] * len(marker) + [False] * (20 - 4 - len(marker))
        assert (r.weights[row, 4:, 1:] == 0).all()
    assert r.closed.all()


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_a_forced_marker_that_closes_early_is_not_forced_into_the_answer(cache_implementation):
    """A marker whose prefix is its suffix ([a, a]) can be completed by the stream's last free token and the first
    forced one: thinking closes there, and the rest of the marker is not forced into the answer."""
    tok2 = tiny_tokenizer(with_think_token=False)
    model2 = tiny_model(tok2).eval()
    a, x, y = (_ids(tok2, c)[0] for c in "axy")
    free = {0: x, 1: x, 2: a}  # the budget (3) is reached with the stream ending in 'a'
    steered = Steered(model2, _force(len(tok2), lambda s: free.get(s, y if s < 8 else EOS)))
    r, _, _ = generate_rollout(
        steered, tok2, ["q"], thinking_end_ids=[a, a], max_thinking_tokens=3, max_new_tokens=12,
        cache_implementation=cache_implementation,
    )  # fmt: skip
    assert tok2.decode(r.completion_ids[0, : r.lengths()[0]]) == "xxaayyyy<eos>"
    assert r.thinking_mask[0].tolist() == [True] * 3 + [False] * 6
    assert r.forced_mask[0].tolist() == [False] * 3 + [True] + [False] * 5
    assert r.closed.tolist() == [True]


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_zero_new_tokens_is_refused(tok, model, cache_implementation):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        generate_rollout(model, tok, ["q"], max_new_tokens=0, cache_implementation=cache_implementation)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_positions_beyond_the_models_limit_are_refused(tok, cache_implementation):
    """A learned-position model (GPT-2) raised a bare IndexError past its positions; the limit counts real tokens, not
    left padding, so a batch whose longest prompt fits is decoded up to the last position."""
    from conftest import chat_batch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=48, pad_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    prompt_len = chat_batch(tok, ["12 * 34?"])[0].size(1)
    fits = 48 - prompt_len
    r, _, _ = generate_rollout(
        model, tok, ["12 * 34?"], max_new_tokens=fits, cache_implementation=cache_implementation
    )
    assert r.ids.size(1) <= fits
    with pytest.raises(ValueError, match=f"max_new_tokens={fits + 1} exceeds the model's max_position_embeddings=48"):
        generate_rollout(model, tok, ["12 * 34?"], max_new_tokens=fits + 1, cache_implementation=cache_implementation)
    input_ids, mask = chat_batch(tok, ["12 * 34?"])
    padded = torch.cat([torch.full_like(input_ids[:, :5], tok.pad_token_id), input_ids], 1)
    mask = torch.cat([torch.zeros_like(mask[:, :5]), mask], 1)
    kwargs = {"width": 3, "thinking_end_ids": [4], "eos_token_ids": [len(tok)], "pad_token_id": tok.pad_token_id}
    r = multiplex_generate(
        model, padded, mask, max_new_tokens=fits, cache_implementation=cache_implementation, **kwargs
    )
    assert r.ids.size(1) == fits  # EOS unreachable: every position up to the last one


def test_stored_logprob_is_the_log_probability_of_sampling_the_stored_trajectory(tok):
    """The method: the trajectory's log-probability factorises over the K draws. End to end over whole rollouts (the
    slot-0 stop rule, EOS during thinking, a budget-forced marker, the answer phase): the frequency of every stored
    trajectory (its ids, slots and phases) matches exp(sum of its stored log-probs over sampled positions).

    A real model (context-dependent distributions through the merged embeddings) restricted to four tokens, K=2, four
    positions, 20,000 rollouts: a few hundred distinct trajectories, Pearson's test over those expected 5+ times, the
    rest pooled with the mass never seen."""
    from collections import Counter

    model = tiny_model(tok).eval()
    with torch.no_grad():
        model.lm_head.weight.div_(4)  # distributions neither flat nor one-hot over the four tokens
    keep = [tok.convert_tokens_to_ids(t) for t in ("a", "b", "</think>", "<eos>")]
    bias = torch.full((len(tok),), float("-inf"))
    bias[keep] = torch.tensor([0.5, 0.0, -0.5, -1.5])
    n = 20000
    r, _, _ = generate_rollout(
        Steered(model, lambda step: bias), tok, ["q"] * n, width=2, max_new_tokens=4, max_thinking_tokens=2
    )
    counts, logps = Counter(), {}
    sampled = r.completion_mask & ~r.forced_mask
    per_row = (r.logprobs * sampled).sum(-1).tolist()
    for row, length in enumerate(r.lengths()):
        key = (tuple(r.ids[row, :length].flatten().tolist()), tuple(r.thinking_mask[row, :length].tolist()))
        counts[key] += 1
        assert abs(logps.setdefault(key, per_row[row]) - per_row[row]) < 1e-4  # same trajectory, same log-prob
    assert r.forced_mask.any() and r.thinking_mask.any() and (r.ids[..., 1] != r.ids[..., 0])[r.thinking_mask].any()
    keys = list(counts)
    observed = torch.tensor([counts[k] for k in keys], dtype=torch.float64)
    expected = torch.tensor([logps[k] for k in keys], dtype=torch.float64).exp() * n
    assert expected.sum() <= n * (1 + 1e-6)  # probabilities of distinct trajectories cannot sum past 1
    big = expected >= 5
    obs = torch.cat([observed[big], n - observed[big].sum().reshape(1)])
    exp = torch.cat([expected[big], n - expected[big].sum().reshape(1)])
    stat, df = float(((obs - exp) ** 2 / exp).sum()), int(big.sum())
    assert df > 100 and stat < df + 5 * (2 * df) ** 0.5, (stat, df)  # ~5 standard deviations above the mean


def test_min_p_filters_every_slot_of_the_rollout(tok, model):
    """min_p reached `filter_logits` in its own tests only; the rollout must pass it on (Soft Thinking's setting)."""
    toks = list(range(17, 22))
    p = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])  # min_p 0.15: the threshold 0.075 drops the last two
    logits = torch.full((len(tok),), -1e4)
    logits[toks] = p.log()
    r, _, _ = generate_rollout(
        Scripted(model, lambda s: logits), tok, ["q"] * 200, max_new_tokens=3, min_p=0.15, thinking_end_ids=[4]
    )
    drawn = r.ids[r.thinking_mask]
    assert set(drawn.unique().tolist()) == set(toks[:3])


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_every_eos_id_ends_a_row(tok, model, cache_implementation):
    """Models with several end tokens (Qwen's <|im_end|> and <|endoftext|>): the second one ends a row too."""
    a, other_eos = _ids(tok, "a")[0], _ids(tok, "b")[0]
    steered = Steered(model, _force(len(tok), lambda s: a if s < 2 else other_eos))
    r, _, _ = generate_rollout(
        steered, tok, ["q"], eos_token_ids=[EOS, other_eos], cache_implementation=cache_implementation
    )
    assert r.lengths() == [3] and r.ids[0, 2].tolist() == [other_eos, PAD, PAD]


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_rows_finishing_at_different_steps_keep_their_own_length_and_flags(tok, model, cache_implementation):
    """A row that closes thinking and ends while others decode on is still `closed` (the eager loop records it as the
    row leaves the batch); the static loop decodes every row to its own end, past its stop checks, and what a
    finished row decodes after its end (thinking on, a budget-forced marker) is in none of the masks."""
    marker, a, b = tok.convert_tokens_to_ids("</think>"), _ids(tok, "a")[0], _ids(tok, "b")[0]
    closes = [0, None, 5, None]  # row 0 closes at step 0, row 2 at step 5; the budget (6) forces row 3
    ends = [2, 3, 12, None]  # row 1 ends while thinking (and thinks on after its end in the static loop's batch)

    def script(row, step):
        if step == ends[row]:
            return EOS
        if closes[row] is not None and step >= closes[row]:
            return marker if step == closes[row] else b
        return a

    r, _, _ = generate_rollout(
        RowScript(model, len(tok), 4, script), tok, ["w", "x", "y", "z"], max_new_tokens=20, max_thinking_tokens=6,
        cache_implementation=cache_implementation,
    )  # fmt: skip
    assert r.lengths() == [3, 4, 13, 20]
    assert r.closed.tolist() == [True, False, True, True]
    assert r.thinking_mask.sum(-1).tolist() == [0, 3, 5, 6]
    assert r.forced_mask.sum(-1).tolist() == [0, 0, 0, 1] and r.forced_mask[3, 6]
    assert tok.decode(r.completion_ids[2, :13]) == "aaaaa</think>bbbbbb<eos>"
    assert tok.decode(r.completion_ids[3, :8]) == "aaaaaa</think>a"


def test_finished_rows_are_padded_and_stop_costing_compute(tok, model):
    a = _ids(tok, "a")[0]

    class RowBias(Steered):
        """Row 0 ends at step 1, row 1 at step 4, row 2 runs to the limit. Finished rows leave the batch in order,
        so the live rows are always the last `n` of the batch."""

        def forward(self, **kwargs):
            out = super().forward(**kwargs)
            n, step = self.batch_sizes[-1], self.step - 1
            b = torch.full((3, len(tok)), 0.0)
            b[:, a] = 1e4
            b[0, EOS] = 3e4 if step == 1 else 0.0
            b[1, EOS] = 3e4 if step == 4 else 0.0
            out.logits[:, -1] += b[3 - n :]
            return out

    steered = RowBias(model, lambda step: torch.zeros(len(tok)))
    r, _, _ = generate_rollout(steered, tok, ["x", "y", "z"], max_new_tokens=8)
    assert r.lengths() == [2, 5, 8]
    assert steered.batch_sizes == [3, 3, 2, 2, 2, 1, 1, 1]  # prefill + 7 decode steps, shrinking
    assert (r.ids[0, 2:] == PAD).all() and (r.weights[0, 2:] == 0).all() and not r.completion_mask[0, 2:].any()
    assert (r.logprobs[0, 2:] == 0).all()


@pytest.mark.parametrize("width,merge", [(3, "weighted"), (2, "averaged"), (1, "weighted")])
def test_rollout_logprobs_match_recompute(tok, model, width, merge):
    """Left padding, mixed finished/unfinished rows, thinking and answer positions, forced budget."""
    r, input_ids, mask = generate_rollout(
        model,
        tok,
        ["1+1?", "what is two plus two?", "x", "a longer prompt here"],
        width=width,
        merge=merge,
        temperature=0.9,
        top_k=40,
        max_new_tokens=40,
        max_thinking_tokens=12,
    )
    assert (mask == 0).any(), "prompts must be left-padded"
    lengths = r.lengths()
    assert min(lengths) < max(lengths) == 40, lengths  # rows that ended early beside rows that ran to the limit
    assert r.thinking_mask.any() and (r.completion_mask & ~r.thinking_mask).any()  # thinking and answer positions
    assert r.forced_mask.any()  # the budget forced the marker somewhere
    lp = recompute(model, input_ids, mask, r, temperature=0.9)
    assert (lp[~r.completion_mask] == 0).all()
    assert (lp - r.logprobs).abs().max().item() < 1e-5


@pytest.mark.parametrize("marker", ["</think>", "the answer"])
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_loop_cost_per_step_is_flat_in_batch_and_length_with_one_host_sync(tok, model, cache_implementation, marker):
    """The issue's target: no Python-side cost that grows with batch or length, no host sync per step beyond the
    end check. EOS is suppressed so every row runs `steps` positions; the counts are of the ops around the forward.
    A one-token marker and a text marker (its matcher: one table lookup per step) alike."""
    from multiplex_trl.markers import thinking_end_automaton, thinking_end_ids

    ids = thinking_end_ids(tok, marker)
    closing = {"thinking_end_ids": ids, "thinking_end_automaton": thinking_end_automaton(tok, marker, ids)}
    no_eos = torch.zeros(len(tok))
    no_eos[EOS] = -1e4
    counts = {}
    for batch in (2, 8):
        for steps in (17, 33, 49):  # 16 apart: a whole number of the static loop's stop-check periods
            steered = Steered(model, lambda step: no_eos)
            with LoopOps(steered) as loop:
                r, _, _ = generate_rollout(
                    steered, tok, ["q" * (i % 3 + 1) for i in range(batch)], max_new_tokens=steps,
                    cache_implementation=cache_implementation, **closing,
                )  # fmt: skip
            assert r.lengths() == [steps] * batch
            counts[batch, steps] = loop.around().total(), loop.syncs_around()
    assert all(counts[2, steps] == counts[8, steps] for steps in (17, 33, 49))  # nothing per row
    per_step = [counts[2, s + 16][0] - counts[2, s][0] for s in (17, 33)]
    assert per_step[0] == per_step[1]  # every step issues the same ops: linear in length
    for steps in (17, 33, 49):
        syncs = counts[2, steps][1]
        if cache_implementation is None:
            assert syncs == steps - 1  # the end check after each decode step but the last
        else:  # an end check every few steps, and the final trim (the longest row's length)
            assert syncs == (steps - 1) // STATIC_STOP_CHECK_EVERY + 1


# Hybrid models: recurrent (linear attention, mamba) layers beside attention; their caches hold per-row states.
HYBRIDS = {
    "qwen3-next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        {"head_dim": 16, "linear_num_value_heads": 2, "linear_num_key_heads": 1, "linear_key_head_dim": 16}
        | {"linear_value_head_dim": 16, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}
        | {"num_experts": 4, "num_experts_per_tok": 2, "layer_types": ["linear_attention", "full_attention"]},
    ),
    "falcon-h1": (
        "FalconH1Config",
        "FalconH1ForCausalLM",
        {"head_dim": 16, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8}
        | {"mamba_n_groups": 1},
    ),
}


@pytest.mark.parametrize("name", HYBRIDS)
def test_finished_rows_leave_the_batch_of_a_hybrid_model(tok, name):
    """A row that ends leaves the batch and the cache, recurrent states included: `batch_select_indices` crashed on
    these caches (Qwen3-Next: linear-attention layers have none; Falcon-H1: it dropped the attention rows only, a
    size mismatch at the next step). The rows left now decode on exactly (stored = teacher-forced log-probs)."""
    import transformers

    from multiplex_trl.testing import _tiny

    config, model_class, kwargs = HYBRIDS[name]
    model = _tiny(
        getattr(transformers, config), getattr(transformers, model_class), tok, 0,
        hidden_size=32, num_hidden_layers=2, intermediate_size=64, **kwargs,
    ).eval()  # fmt: skip
    questions = ["1+1?", "what is two plus two?", "x"]
    eos = list(range(0, len(tok), 9))  # many end tokens: rows end at different steps
    r, input_ids, mask = generate_rollout(
        model, tok, questions, temperature=0.9, max_new_tokens=24, max_thinking_tokens=8, eos_token_ids=eos
    )
    lengths = r.lengths()
    assert len(set(lengths)) > 1 and min(lengths) < 24  # rows left the batch while others decoded on
    assert (recompute(model, input_ids, mask, r, temperature=0.9) - r.logprobs).abs().max().item() < 1e-5
