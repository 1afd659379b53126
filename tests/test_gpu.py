"""The CUDA paths: TRL's Triton log-prob kernel, bf16 autocast, a training step on the GPU."""

import pytest
import torch
from conftest import check_text_marker_closes_where_written, generate_rollout, recompute

from multiplex_trl.static_decode import compiled_decode_step
from multiplex_trl.testing import tiny_model


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")


def _rollout(model, tok, **kw):
    questions = ["1+1?", "what is two plus two?", "x", "a longer prompt here"]
    return generate_rollout(model, tok, questions, device="cuda", max_new_tokens=48, max_thinking_tokens=16, **kw)


def test_rollout_logprobs_match_recompute_on_cuda_fp32(tok):
    model = tiny_model(tok).cuda().eval()
    r, input_ids, mask = _rollout(model, tok, top_k=40)
    lp = recompute(model, input_ids, mask, r, temperature=1.0)
    assert r.ids.is_cuda and lp.is_cuda
    assert (lp - r.logprobs).abs().max().item() < 1e-4  # TF32-free fp32, Triton kernel vs cuBLAS decode


def test_cuda_scoring_equals_cpu_scoring_with_gradients(tok):
    """The log-prob pass on CUDA (TRL's Triton kernels) against the CPU pass (its torch ops) on the same K=3 rollout:
    log-probs, entropies and every parameter's gradient agree (fp32)."""
    from multiplex_trl.logprobs import multiplex_logprobs

    model = tiny_model(tok).cuda().eval()
    r, input_ids, mask = _rollout(model, tok, top_k=40)
    assert (r.ids[..., 1:] != r.ids[..., :1]).any()
    results = []
    for device in ("cuda", "cpu"):
        m = model.to(device)
        m.zero_grad()
        args = [t.to(device) for t in (input_ids, mask, r.ids, r.weights, r.completion_mask)]
        lp, ent = multiplex_logprobs(
            m, *args, temperature=0.9, thinking_mask=r.thinking_mask.to(device), compute_entropy=True
        )
        ((lp * torch.linspace(-1, 1, lp.size(1), device=device)).sum() + ent.sum()).backward()
        results.append((lp.cpu(), ent.cpu(), {n: p.grad.cpu() for n, p in m.named_parameters()}))
    (lp_gpu, ent_gpu, grads_gpu), (lp_cpu, ent_cpu, grads_cpu) = results
    torch.testing.assert_close(lp_gpu, lp_cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ent_gpu, ent_cpu, atol=1e-4, rtol=1e-4)
    for name, grad in grads_cpu.items():
        torch.testing.assert_close(grads_gpu[name], grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_a_text_marker_closes_where_its_text_is_first_written_on_cuda(tok, cache_implementation):
    """The text marker's table lookup on the device (the table given on CUDA, narrower than the vocabulary)."""
    check_text_marker_closes_where_written(tok, "cuda", cache_implementation)


def test_bf16_recompute_is_close_to_rollout(tok):
    model = tiny_model(tok).cuda().to(torch.bfloat16).eval()
    r, input_ids, mask = _rollout(model, tok)
    lp = recompute(model, input_ids, mask, r, temperature=1.0)
    diff = (lp - r.logprobs)[r.completion_mask].abs()
    # bf16 keeps ~3 significant digits of each logit: the per-position gap stays at that scale
    assert diff.mean().item() < 0.1, diff.mean().item()


def test_training_step_on_gpu_bf16(tmp_path, tok):
    from test_trainer import _args, _trainer

    model = tiny_model(tok)
    tr = _trainer(tok, model, _args(tmp_path, use_cpu=False, bf16=True, max_steps=2, gradient_checkpointing=True))
    tr.train()
    logs = tr.state.log_history[0]
    assert torch.isfinite(torch.tensor(logs["loss"])) and "multiplex/branch_rate" in logs
    assert next(model.parameters()).is_cuda


@pytest.mark.parametrize("compile", [False, True], ids=["static", "static+cuda-graphs"])
def test_static_cache_and_cuda_graph_decode_store_exact_logprobs(tok, compile):
    """The fast decode path on the GPU: what it stores is exact (recompute) and it decodes the same lengths' worth of
    positions as the reference eager loop's shapes allow (same [B, T, K] layout, every row's positions contiguous)."""
    model = tiny_model(tok).cuda().eval()
    r, input_ids, mask = _rollout(model, tok, top_k=40, cache_implementation="static", compile=compile)
    lp = recompute(model, input_ids, mask, r, temperature=1.0)
    assert (lp - r.logprobs).abs().max().item() < 1e-4
    lengths = r.completion_mask.sum(-1)
    assert (r.completion_mask == (torch.arange(r.ids.size(1), device="cuda") < lengths[:, None])).all()
    if compile:  # the compiled step is reused by the next rollout (no recompilation for the same shapes)
        step = compiled_decode_step(model)
        again, _, _ = _rollout(model, tok, top_k=40, cache_implementation="static", compile=True)
        assert compiled_decode_step(model) is step and again.completion_mask.any()


def _cuda_graphs_recorded() -> int:
    """How many CUDA graphs torch's cudagraph trees hold on this device (recordings, not replays)."""
    from torch._inductor.cudagraph_trees import get_manager

    manager = get_manager(torch.cuda.current_device(), create_if_none_exists=False)

    def count(nodes):
        return sum(1 + count([c for children in n.children.values() for c in children]) for n in nodes)

    return 0 if manager is None else count(list(manager.get_roots()))


def test_cuda_graph_decode_replays_across_rollouts_without_recording_again(tok):
    """The compiled step keeps its KV cache, so later rollouts of the same shape replay the recorded graphs (a new
    cache each rollout would record them again every time) and nothing falls back to eager."""
    from torch._dynamo.utils import counters

    model = tiny_model(tok).cuda().eval()
    kwargs = {"top_k": 40, "cache_implementation": "static", "compile": True}
    skips = counters["inductor"]["cudagraph_skips"]  # counted for the whole process, across tests
    _rollout(model, tok, **kwargs)
    _rollout(model, tok, **kwargs)  # warm-up and recording are done by now
    recorded = _cuda_graphs_recorded()
    assert recorded > 0
    for _ in range(3):
        r, input_ids, mask = _rollout(model, tok, **kwargs)
    assert _cuda_graphs_recorded() == recorded
    assert counters["inductor"]["cudagraph_skips"] == skips
    assert (recompute(model, input_ids, mask, r, temperature=1.0) - r.logprobs).abs().max().item() < 1e-4


def test_training_step_with_cuda_graph_decode(tmp_path, tok):
    from test_trainer import _args, _trainer

    model = tiny_model(tok)
    args = _args(
        tmp_path, use_cpu=False, bf16=True, max_steps=2, cache_implementation="static", multiplex_compile=True
    )
    tr = _trainer(tok, model, args)
    tr.train()
    assert torch.isfinite(torch.tensor(tr.state.log_history[0]["loss"]))
    assert "_multiplex_compiled_decode" in model.__dict__
