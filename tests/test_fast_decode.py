"""The fast decode path (static KV cache, compiled decode step) against the reference eager loop."""

import copy

import pytest
import torch
from conftest import Steered, generate_rollout, recompute

from multiplex_trl.rollout import STATIC_STOP_CHECK_EVERY
from multiplex_trl.static_decode import STATIC_CACHE_BUCKET, compiled_decode_step, static_cache_length
from multiplex_trl.testing import tiny_model, tiny_tokenizer


EOS = 1
FIELDS = ("ids", "weights", "thinking_mask", "completion_mask", "forced_mask", "closed")
EXACT = ("ids", "thinking_mask", "completion_mask", "forced_mask", "closed")  # weights/log-probs: up to rounding


def _assert_same(a, b, atol=1e-5):
    for field in EXACT:
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert (a.weights - b.weights).abs().max().item() < atol
    assert (a.logprobs - b.logprobs).abs().max().item() < atol


def _scripted(tok, step_to_bias):
    """A steered tiny model whose every row follows `step_to_bias(step)` -> {token: logit} (None: own logits)."""
    model = tiny_model(tok).eval()

    def bias(step):
        script = step_to_bias(step)
        if script is None:
            return None
        b = torch.full((len(tok),), -1e4)
        for t, v in script.items():
            b[t] = v + 1e4
        return b

    return Steered(model, bias)


def _scenarios():
    tok = tiny_tokenizer()
    plain = tiny_tokenizer(with_think_token=False)
    marker = tok.convert_tokens_to_ids("</think>")
    a, b = tok.encode("ab", add_special_tokens=False)
    plain_a = plain.encode("a", add_special_tokens=False)[0]
    return {
        # branching thinking, the marker at step 3, answer, EOS at step 6
        "stop_rule": (tok, lambda s: {0: {a: 0.0, b: 0.0}, 1: {a: 0.0, b: 0.3}, 3: {marker: 0}}.get(s, {EOS: 0.0})
                      if s in (0, 1, 3) or s >= 6 else {a: 0.0, b: 0.0} if s == 2 else {b: 0.0}, {}),
        # EOS in slot 0 half the time: rows end at different steps
        "mixed_lengths": (tok, lambda s: {a: 0.0, EOS: -1.0}, {}),
        # never closes: the budget forces the 8-token marker of a tokenizer without </think>
        "budget": (plain, lambda s: {plain_a: 0.0}, {"max_thinking_tokens": 4, "max_new_tokens": 20}),
        # the model's own distribution, top-k / top-p filtering, a budget
        "free": (tok, lambda s: None, {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "max_thinking_tokens": 10}),
    }  # fmt: skip


@pytest.mark.parametrize("scenario", ["stop_rule", "mixed_lengths", "budget", "free"])
def test_static_cache_matches_eager_loop_while_no_row_has_finished(scenario):
    """Same draws until the first row finishes (the eager loop then drops the row, so later draws use other RNG
    numbers); on scripted rollouts where rows end together or by script the two are identical throughout."""
    tok, script, kwargs = _scenarios()[scenario]
    questions = ["hi", "what is two plus two?", "x", "a longer prompt here"]
    eager, _, _ = generate_rollout(_scripted(tok, script), tok, questions, **kwargs)
    static, _, _ = generate_rollout(_scripted(tok, script), tok, questions, cache_implementation="static", **kwargs)
    lengths = eager.lengths()
    if scenario in ("stop_rule", "budget"):  # deterministic scripts: the whole rollout is identical
        _assert_same(eager, static)
        return
    first_end = min(lengths)

    def cut(r):
        return type(r)(**{f: getattr(r, f)[:, :first_end] for f in (*FIELDS[:-1], "logprobs")}, closed=r.closed)

    _assert_same(cut(eager), cut(static))
    if scenario == "mixed_lengths":
        assert min(lengths) < max(lengths), "rows should end at different steps"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_static_cache_rollout_logprobs_match_recompute(tok, attn):
    """Every stored position of the static path (left padding, rows ending at different steps) is exact."""
    model = tiny_model(tok).eval()
    model.set_attn_implementation(attn)
    questions = ["1+1?", "what is two plus two?", "x", "a longer prompt here"]
    r, input_ids, mask = generate_rollout(
        model,
        tok,
        questions,
        cache_implementation="static",
        temperature=0.9,
        max_new_tokens=40,
        max_thinking_tokens=12,
    )
    assert (mask == 0).any()
    lp = recompute(model, input_ids, mask, r, temperature=0.9)
    assert (lp[~r.completion_mask] == 0).all() and (r.logprobs[~r.completion_mask] == 0).all()
    assert (lp - r.logprobs).abs().max().item() < 1e-5
    assert r.thinking_mask.any() and (~r.thinking_mask & r.completion_mask).any()


@pytest.mark.parametrize("compile", [False, True], ids=["static", "compiled"])
def test_static_cache_under_bf16_autocast_with_float32_weights(tok, compile):
    """Mixed precision (float32 weights, the forward under bf16 autocast, as accelerate runs it with bf16=True):
    RoPE leaves keys in float32 while values are bf16. The static cache stores both widened to float32 (exact), so it
    decodes what the eager loop decodes; transformers' StaticCache failed here in index_copy_."""
    model = tiny_model(tok).eval()
    questions = ["1+1?", "what is two plus two?", "x"]
    kwargs = {"temperature": 0.9, "max_new_tokens": 24, "max_thinking_tokens": 10}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, input_ids, mask = generate_rollout(model, tok, questions, **kwargs)
        static, _, _ = generate_rollout(
            model, tok, questions, cache_implementation="static", compile=compile, **kwargs
        )
        lp = recompute(model, input_ids, mask, static, temperature=0.9)
    cache = compiled_decode_step(model).cache if compile else None
    if compile:  # inductor fuses bf16 ops differently: same program, other rounding, so other samples
        assert {layer.values.dtype for layer in cache.layers} == {torch.float32}
        assert static.completion_mask.any()
    else:
        first_end = min(eager.lengths())
        assert torch.equal(eager.ids[:, :first_end], static.ids[:, :first_end])
        assert (eager.logprobs - static.logprobs)[:, :first_end].abs().max().item() < 1e-5
    diff = (lp - static.logprobs)[static.completion_mask].abs()
    assert diff.mean().item() < 0.05, diff.mean().item()  # bf16 rounding of the teacher-forced pass, no more


def test_static_cache_keeps_the_batch_and_stores_only_live_positions(tok):
    a = tok.encode("a", add_special_tokens=False)[0]
    marker = tok.convert_tokens_to_ids("</think>")

    class RowBias(Steered):
        """Row 0 ends at step 1 while thinking and writes the marker after its end; row 1 closes thinking at step 2
        and ends at step 4; row 2 runs to the limit, thinking (the batch never shrinks here)."""

        def forward(self, **kwargs):
            out = super().forward(**kwargs)
            step = self.step - 1
            b = torch.zeros(3, len(tok))
            b[:, a] = 1e4
            b[0, EOS] = 3e4 if step == 1 else 0.0
            b[0, marker] = 3e4 if step >= 2 else 0.0
            b[1, marker] = 3e4 if step == 2 else 0.0
            b[1, EOS] = 3e4 if step == 4 else 0.0
            out.logits[:, -1] += b
            return out

    steered = RowBias(tiny_model(tok).eval(), lambda step: torch.zeros(len(tok)))
    r, _, _ = generate_rollout(steered, tok, ["x", "y", "z"], max_new_tokens=8, cache_implementation="static")
    assert r.lengths() == [2, 5, 8]
    assert r.closed.tolist() == [False, True, False]  # what a row decodes after its end does not count
    assert r.thinking_mask.tolist()[1] == [True, True, False, False, False, False, False, False]
    assert steered.batch_sizes == [3] * 8  # prefill + 7 decode steps, fixed shapes
    assert not r.completion_mask[0, 2:].any() and (r.ids[0, 2:] == tok.pad_token_id).all()
    assert (r.weights[0, 2:] == 0).all() and (r.logprobs[0, 2:] == 0).all()


def test_static_loop_checks_for_the_end_every_few_steps_and_trims_the_tail(tok):
    """All rows end at step 2: the eager loop stops at once; the static loop runs on to its next stop check (no host
    sync per step) and drops the steps decoded after the end, so both return the same rollout."""
    a = tok.encode("a", add_special_tokens=False)[0]
    script = lambda s: {a: 0.0} if s < 2 else {EOS: 0.0}  # noqa: E731
    eager_model, static_model = _scripted(tok, script), _scripted(tok, script)
    eager, _, _ = generate_rollout(eager_model, tok, ["x", "yy"], max_new_tokens=30)
    static, _, _ = generate_rollout(static_model, tok, ["x", "yy"], max_new_tokens=30, cache_implementation="static")
    assert eager.lengths() == [3, 3] and eager.ids.size(1) == 3
    _assert_same(eager, static)
    assert len(eager_model.batch_sizes) == 1 + 2  # prefill + decode steps 1-2
    assert len(static_model.batch_sizes) == STATIC_STOP_CHECK_EVERY  # prefill + steps 1..7, checked after step 7


def test_static_cache_length_is_bucketed_within_the_models_positions(tok):
    model = tiny_model(tok)  # max_position_embeddings 1024
    assert static_cache_length(model.config, 10) == STATIC_CACHE_BUCKET
    assert static_cache_length(model.config, STATIC_CACHE_BUCKET) == STATIC_CACHE_BUCKET  # a full bucket fits
    assert static_cache_length(model.config, STATIC_CACHE_BUCKET + 1) == 2 * STATIC_CACHE_BUCKET
    assert static_cache_length(model.config, 1000) == 1024  # capped at the model's positions
    assert static_cache_length(model.config, 1030) == 1030  # never below what the rollout needs


@pytest.mark.parametrize("filters", [{}, {"top_k": 40, "top_p": 0.95, "min_p": 0.05}], ids=["plain", "filtered"])
def test_compiled_decode_step_matches_the_uncompiled_static_loop(tok, filters):
    """torch.compile (inductor on CPU; CUDA graphs on a GPU, see tests/test_gpu.py) changes nothing but speed. The
    compiled step is the slots' merge, the forward and the next position's temperature and filters: one graph, no
    graph break, whatever the sampling options."""
    from torch._dynamo.utils import counters

    model = tiny_model(tok).eval()
    questions = ["1+1?", "what is two plus two?", "x"]
    kwargs = {"cache_implementation": "static", "temperature": 0.9, "max_new_tokens": 24, "max_thinking_tokens": 10}
    kwargs.update(filters)
    ref, input_ids, mask = generate_rollout(model, tok, questions, **kwargs)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    fast, _, _ = generate_rollout(model, tok, questions, compile=True, **kwargs)
    assert counters["stats"]["unique_graphs"] == graphs + 1 and sum(counters["graph_break"].values()) == breaks
    _assert_same(ref, fast)
    compiled = compiled_decode_step(model)
    again, _, _ = generate_rollout(model, tok, questions, compile=True, seed=1, **kwargs)  # reuses the compiled step
    assert compiled_decode_step(model) is compiled
    lp = recompute(model, input_ids, mask, again, temperature=0.9)
    assert (lp - again.logprobs).abs().max().item() < 1e-5

    # A deep copy (another policy) gets its own compiled step, never the original model's weights.
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(-1.0)
    assert compiled_decode_step(other) is not compiled
    flipped, _, _ = generate_rollout(other, tok, questions, compile=True, **kwargs)
    assert (recompute(other, input_ids, mask, flipped, temperature=0.9) - flipped.logprobs).abs().max().item() < 1e-5


def test_compiled_decode_keeps_one_cache_and_graph_across_rollouts(tok):
    """Rollouts decode into the same cache tensors (CUDA graphs replay only on recorded addresses), reset in place;
    a shorter rollout reuses a longer cache (masked) instead of switching shapes, and equals the same rollout on a
    fresh copy with a cache of its own length. Only a longer rollout or another batch size makes a new cache."""
    from torch._dynamo.utils import counters

    model = tiny_model(tok).eval()
    fresh = copy.deepcopy(model)
    kwargs = {"cache_implementation": "static", "compile": True, "temperature": 0.9, "max_thinking_tokens": 10}
    long_questions = ["a longer prompt here, to fill the cache", "y", "z"]
    generate_rollout(model, tok, long_questions, max_new_tokens=STATIC_CACHE_BUCKET, **kwargs)
    compiled = compiled_decode_step(model)
    cache = compiled.cache
    assert compiled.cache_len == 2 * STATIC_CACHE_BUCKET
    keys = [layer.keys.data_ptr() for layer in cache.layers]
    graphs = counters["stats"]["unique_graphs"]
    short_questions = ["1+1?", "what is two plus two?", "x"]
    reused, _, _ = generate_rollout(model, tok, short_questions, max_new_tokens=24, **kwargs)
    assert compiled.cache is cache and [layer.keys.data_ptr() for layer in cache.layers] == keys
    assert counters["stats"]["unique_graphs"] == graphs, "the shorter rollout recompiled the decode step"
    assert compiled_decode_step(fresh) is not compiled  # the copy made before compiling has no state
    first, _, _ = generate_rollout(fresh, tok, short_questions, max_new_tokens=24, **kwargs)
    assert compiled_decode_step(fresh).cache_len == STATIC_CACHE_BUCKET
    _assert_same(reused, first)

    generate_rollout(model, tok, long_questions, max_new_tokens=2 * STATIC_CACHE_BUCKET, **kwargs)  # grows
    assert compiled.cache is not cache and compiled.cache_len == 3 * STATIC_CACHE_BUCKET
    generate_rollout(model, tok, ["x", "y"], max_new_tokens=24, **kwargs)  # another batch size: another cache
    assert compiled.cache.layers[0].keys.size(0) == 2 and compiled.cache_len == STATIC_CACHE_BUCKET


def test_compiled_decode_with_a_sliding_window_that_spans_the_cache(tok):
    """A window at least as long as the rollout never slides: the cache is capped at the window and its layers are
    plain static ones, so the compiled step is one graph for every position (a sliding layer's Python position
    counter made it recompile at each step until torch gave up and ran it eagerly) and stays exact."""
    from torch._dynamo.utils import counters

    model = tiny_model(tok, sliding_window=300).eval()
    assert static_cache_length(model.config, 40) == 256 and static_cache_length(model.config, 260) == 300
    questions = ["1+1?", "what is two plus two?", "x"]
    kwargs = {"cache_implementation": "static", "temperature": 0.9, "max_thinking_tokens": 10}
    ref, input_ids, mask = generate_rollout(model, tok, questions, **kwargs)
    graphs = counters["stats"]["unique_graphs"]
    fast, _, _ = generate_rollout(model, tok, questions, compile=True, **kwargs)
    generate_rollout(model, tok, ["a", "bb", "ccc"], compile=True, **kwargs)
    assert counters["stats"]["unique_graphs"] == graphs + 1, "the compiled step recompiled during the rollouts"
    assert all(type(layer).__name__ == "StaticLayer" for layer in compiled_decode_step(model).cache.layers)
    _assert_same(ref, fast)
    assert (recompute(model, input_ids, mask, fast, temperature=0.9) - fast.logprobs).abs().max().item() < 1e-5


def test_a_cache_that_slides_is_refused_compiled_and_exact_uncompiled(tmp_path, tok):
    model = tiny_model(tok, sliding_window=8).eval()
    kwargs = {"cache_implementation": "static", "max_thinking_tokens": 10}
    with pytest.raises(ValueError, match=r"sliding window \(8\).*multiplex_compile=False") as err:
        generate_rollout(model, tok, ["x"], compile=True, **kwargs)
    assert "\n" not in str(err.value)
    r, input_ids, mask = generate_rollout(model, tok, ["1+1?", "what is two plus two?"], **kwargs)
    assert r.completion_mask.sum(-1).max().item() + input_ids.size(1) > 8  # the window really slid
    assert (recompute(model, input_ids, mask, r) - r.logprobs).abs().max().item() < 1e-5

    from test_trainer import _args, _trainer  # a trainer refuses it before training

    args = _args(tmp_path, cache_implementation="static", multiplex_compile=True, max_completion_length=20)
    with pytest.raises(ValueError, match=r"needs a KV cache that never slides.*multiplex_compile=False"):
        _trainer(tok, model, args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"cache_implementation": "offloaded"}, "cache_implementation must be one of"),
        ({"compile": True}, "set cache_implementation='static'"),
    ],
)
def test_bad_decode_options_fail_in_one_line(tok, kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        generate_rollout(tiny_model(tok).eval(), tok, ["x"], **kwargs)
    assert "\n" not in str(err.value)


def test_compiled_decode_after_a_rollout_under_inference_mode(tok):
    """A rollout under torch.inference_mode (an evaluation harness) left the kept cache holding inference tensors,
    and the next rollout outside it failed updating them in place; it now decodes into a cache of its own."""
    model = tiny_model(tok).eval()
    kwargs = {"cache_implementation": "static", "temperature": 0.9, "max_new_tokens": 12}
    questions = ["1+1?", "x"]
    with torch.inference_mode():
        generate_rollout(model, tok, questions, compile=True, **kwargs)
    fast, _, _ = generate_rollout(model, tok, questions, compile=True, **kwargs)
    assert not compiled_decode_step(model).cache.layers[0].keys.is_inference()
    _assert_same(generate_rollout(model, tok, questions, **kwargs)[0], fast)


def test_static_cache_prefills_a_hybrid_model_with_the_prompts_own_mask(tok):
    """Recurrent layers (mamba, conv, linear attention) zero the prompt's padding with the last P columns of the 2D
    mask; the static prefill gave them the mask of the whole cache, whose last columns are its empty tail, so every
    prompt read as padding (a tiny Granite 4.0-H: log-probs 0.3 off, other tokens). Left-padded, it now decodes what
    the eager loop decodes, exactly."""
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    from multiplex_trl.testing import _tiny

    hybrid = {"layer_types": ["mamba", "attention"], "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8}
    hybrid.update(mamba_n_groups=1, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)
    model = _tiny(
        GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM, tok, 0, hidden_size=32, num_hidden_layers=2, **hybrid
    )
    questions = ["1+1?", "what is two plus two?", "x"]
    kwargs = {"temperature": 0.9, "max_new_tokens": 16, "max_thinking_tokens": 8}
    eager, input_ids, mask = generate_rollout(model.eval(), tok, questions, **kwargs)
    static, _, _ = generate_rollout(model, tok, questions, cache_implementation="static", **kwargs)
    assert (mask == 0).any()
    first_end = min(eager.lengths())
    assert torch.equal(eager.ids[:, :first_end], static.ids[:, :first_end])
    assert (recompute(model, input_ids, mask, static, temperature=0.9) - static.logprobs).abs().max().item() < 1e-5


def _tiny_gpt_neo(tok):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    config = GPTNeoConfig(
        hidden_size=32, num_layers=2, num_heads=4, vocab_size=len(tok), attention_types=[[["global", "local"], 1]],
        window_size=6, max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return GPTNeoForCausalLM(config).eval()


def test_static_cache_refuses_local_attention_it_would_decode_wrongly(tmp_path, tok):
    """GPT-Neo's local layers take their window from the rows of a mask buffer at the cache's length, not at the
    position: with a static cache they attended to the empty end of the cache (log-probs 0.1 off the teacher-forced
    pass, other samples). Refused in one line; the default loop is exact."""
    model = _tiny_gpt_neo(tok)
    with pytest.raises(ValueError, match=r"cache_implementation='static' cannot decode this model.*local") as err:
        generate_rollout(model, tok, ["x"], cache_implementation="static")
    assert "\n" not in str(err.value)
    r, input_ids, mask = generate_rollout(model, tok, ["1+1?", "what is two plus two?"], temperature=0.9)
    assert (recompute(model, input_ids, mask, r, temperature=0.9) - r.logprobs).abs().max().item() < 1e-5

    from multiplex_trl.inference import UsageError, check_engine

    model.config.save_pretrained(tmp_path)  # the CLIs refuse it from the config, before the model loads
    with pytest.raises(UsageError, match="cannot decode this model"):
        check_engine("static", False, str(tmp_path), 16)
    check_engine(None, False, str(tmp_path), 16)
