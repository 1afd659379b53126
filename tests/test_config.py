import pytest

from multiplex_trl import MultiplexGRPOConfig, MultiplexGRPOTrainer


def _config(**kw):
    return MultiplexGRPOConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none", **kw)


def test_defaults_are_the_papers():
    args = _config()
    assert (args.multiplex_width, args.multiplex_merge, args.thinking_end) == (3, "weighted", "</think>")
    assert args.max_thinking_tokens is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"multiplex_width": 0}, "multiplex_width must be an integer >= 1"),
        ({"multiplex_width": "3"}, "multiplex_width must be an integer >= 1"),
        ({"multiplex_width": 2.5}, "multiplex_width must be an integer >= 1"),
        ({"multiplex_width": True}, "multiplex_width must be an integer >= 1"),
        ({"multiplex_merge": "max"}, "multiplex_merge must be one of"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"thinking_end": ""}, "thinking_end must be a non-empty string"),
        ({"max_thinking_tokens": 512, "max_completion_length": 512}, "max_thinking_tokens .* must be smaller"),
        ({"max_thinking_tokens": -1}, "max_thinking_tokens must be a non-negative integer"),
        ({"use_vllm": True}, "use_vllm=True cannot run multiplex rollouts"),
        ({"repetition_penalty": 1.2}, "repetition_penalty is not supported"),
        ({"cache_implementation": "offloaded"}, "cache_implementation must be one of"),
        ({"multiplex_compile": True}, "set cache_implementation='static'"),
        ({"multiplex_width": 1, "repetition_penalty": 1.2}, "repetition_penalty is not supported"),  # width 1 too
        ({"min_p": 2.0}, r"min_p must be in \[0, 1\]"),
        ({"num_generations": 0}, "num_generations must be an integer >= 1"),  # TRL: ZeroDivisionError
        ({"num_iterations": 0}, "num_iterations must be an integer >= 1"),  # TRL: zero training steps
        ({"max_completion_length": 0}, "max_completion_length must be an integer >= 1"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be an integer >= 1"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an integer >= 1"),
        ({"learning_rate": -1.0}, "learning_rate must be >= 0"),
        ({"loss_type": "ppo"}, r"loss_type must be one of \['grpo', "),  # TRL: after a whole rollout
        ({"generation_kwargs": {"temperature": 0.5}}, r"generation_kwargs \['temperature'\] cannot be applied"),
        ({"generation_kwargs": '{"top_p": 0}'}, r"generation_kwargs: top_p must be in \(0, 1\]"),
        ({"use_transformers_continuous_batching": True}, "use_transformers_continuous_batching does not apply"),
        ({"gumbel_tau": 0.3}, "gumbel_tau applies to mixer='gumbel' only, but mixer is 'multiplex'"),
        ({"cold_stop_entropy": 0.01}, "cold_stop_entropy applies to mixer='soft' only"),
        ({"mixer": "dirichlet", "multiplex_merge": "averaged"}, "multiplex_merge applies to mixer='multiplex' only"),
    ],
)
def test_bad_config_is_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        _config(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "generation_kwargs",
    [{"top_k": 1, "do_sample": True}, {"top_p": 1e-6, "top_k": 50}, {"min_p": 1.0}],
    ids=["top_k", "top_p", "min_p"],
)
def test_generation_kwargs_set_the_rollouts_sampling(tok, model, monkeypatch, generation_kwargs):
    """TRL's generation_kwargs override top_p / top_k / min_p; the multiplex rollout ignored them. Each of these
    settings alone makes sampling greedy."""
    from datasets import Dataset

    import multiplex_trl.trainer as trainer_module

    args = _config(generation_kwargs=generation_kwargs, max_completion_length=12, num_generations=4)
    args.per_device_train_batch_size = 4
    trainer = MultiplexGRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": "1+1?"}]] * 4}),
        processing_class=tok,
    )
    seen = {}
    rollout = trainer_module.multiplex_generate

    def recording(*a, **kw):
        seen.update(kw)
        return rollout(*a, **kw)

    monkeypatch.setattr(trainer_module, "multiplex_generate", recording)
    batch = trainer._generate_and_score_completions([{"prompt": [{"role": "user", "content": "1+1?"}]}] * 4)
    for key in ("top_p", "top_k", "min_p"):
        assert seen[key] == generation_kwargs.get(key, getattr(args, key)), key
    assert (batch["completion_ids"] == batch["completion_ids"][:1]).all()  # top-k 1: greedy, one text
    assert (
        batch["multiplex_ids"][..., 1:][batch["thinking_mask"]]
        == batch["multiplex_ids"][..., :1][batch["thinking_mask"]]
    ).all()


def test_unencodable_marker_is_refused_before_the_model_loads(tiny_model_dir, monkeypatch):
    import transformers

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the marker was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    monkeypatch.setattr("trl.trainer.grpo_trainer.create_model_from_path", no_load)
    with pytest.raises(ValueError, match="thinking_end='§' cannot be encoded by this tokenizer"):
        MultiplexGRPOTrainer(
            model=tiny_model_dir, reward_funcs=lambda completions, **kw: [0.0], args=_config(thinking_end="§")
        )


def test_tools_are_refused_with_multiplex(tok, model):
    def tool(x: int) -> int:
        """Adds one.

        Args:
            x: a number
        """
        return x + 1

    with pytest.raises(ValueError, match="tools is not supported with multiplex rollouts"):
        MultiplexGRPOTrainer(
            model=model,
            reward_funcs=lambda completions, **kw: [0.0],
            args=_config(),
            processing_class=tok,
            tools=[tool],
        )


@pytest.mark.parametrize(
    "env", [{"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, {"ACCELERATE_USE_FSDP": "true"}], ids=["zero3", "fsdp"]
)
def test_compiled_decode_is_refused_where_parameters_are_gathered_per_generation(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _config(cache_implementation="static")  # the static cache alone is fine
    with pytest.raises(ValueError, match="multiplex_compile=True cannot run under DeepSpeed ZeRO-3 or FSDP") as info:
        _config(cache_implementation="static", multiplex_compile=True)
    assert "\n" not in str(info.value)


def test_the_accepted_loss_types_are_the_pinned_trls():
    import re

    from trl import GRPOConfig

    from multiplex_trl.config import TRL_LOSS_TYPES

    help_text = GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    supported = re.findall(r"'(\w+)'", help_text.split("Supported values are")[1].split(". ")[0])
    assert sorted(supported) == sorted(TRL_LOSS_TYPES)
