import pytest
import torch

from multiplex_trl import MultiplexGRPOConfig, MultiplexGRPOTrainer


def _config(**kw):
    return MultiplexGRPOConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none", **kw)


def test_defaults_are_the_papers():
    args = _config()
    assert (args.multiplex_width, args.multiplex_merge, args.thinking_end) == (3, "weighted", "</think>")
    assert args.max_thinking_tokens is None


def test_a_thinking_budget_one_below_the_completion_length_is_accepted():
    """The budget leaves room for the forced marker and at least one answer token."""
    assert _config(max_thinking_tokens=511, max_completion_length=512).max_thinking_tokens == 511


def test_mixer_parameter_defaults_are_their_papers_and_the_mixers():
    """Each mixer's field defaults to its paper's value (MoT-G's gamma 4, Stochastic Soft Thinking's tau 0.5, Soft
    Thinking's 256 cold-stop steps, its cold stop off) and to the mixer's own default, so a config that leaves them
    alone trains and decodes with the same mixer as `generate` does."""
    from multiplex_trl.mixers import MIXERS
    from multiplex_trl.mixers.base import constructor_defaults

    args = _config()
    assert (args.mixer, args.dirichlet_gamma, args.gumbel_tau) == ("multiplex", 4.0, 0.5)
    assert (args.cold_stop_entropy, args.cold_stop_steps) == (None, 256)
    for name in MIXERS:
        for param, default in constructor_defaults(name).items():
            field = param if hasattr(args, param) else f"multiplex_{param}"
            assert getattr(args, field) == default, (name, field)


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
        ({"generation_kwargs": {"min_p": 2.0}}, r"generation_kwargs: top_p must be in \(0, 1\] and min_p in \[0, 1\]"),
        # greedy decoding asked for: the rollout always samples
        ({"generation_kwargs": {"do_sample": False}}, r"generation_kwargs \['do_sample'\] cannot be applied"),
        ({"reward_error": "skip"}, "reward_error must be 'raise' or 'none', got 'skip'"),  # 'skip' scored None
        ({"max_thinking_tokens": True}, "max_thinking_tokens must be a non-negative integer"),
        ({"use_transformers_continuous_batching": True}, "use_transformers_continuous_batching does not apply"),
        ({"gumbel_tau": 0.3}, "gumbel_tau applies to mixer='gumbel' only, but mixer is 'multiplex'"),
        ({"cold_stop_entropy": 0.01}, "cold_stop_entropy applies to mixer='soft' only"),
        ({"mixer": "dirichlet", "multiplex_merge": "averaged"}, "multiplex_merge applies to mixer='multiplex' only"),
        # TRL: after the model loads and a whole rollout has been scored
        ({"importance_sampling_level": "seq"}, r"importance_sampling_level must be one of \['token', 'sequence'\]"),
        ({"scale_rewards": "groups"}, r"scale_rewards must be one of \['group', 'batch', 'none'\], got 'groups'"),
        ({"multi_objective_aggregation": "sum"}, r"multi_objective_aggregation must be one of"),
        # width 1 with vLLM is TRL's generation: the multiplex rollout's settings would be ignored
        (
            {"multiplex_width": 1, "use_vllm": True, "max_thinking_tokens": 2},
            "max_thinking_tokens needs the multiplex",
        ),
        ({"multiplex_width": 1, "use_vllm": True, "mixer": "dirichlet"}, "mixer needs the multiplex rollout"),
        ({"multiplex_width": 1, "use_vllm": True, "multiplex_merge": "averaged"}, "multiplex_merge needs the"),
        ({"multiplex_width": 1, "use_vllm": True, "multiplex_compile": True}, "multiplex_compile needs the"),
    ],
)
def test_bad_config_is_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        _config(**kwargs)
    assert "\n" not in str(info.value)


def _recorded_rollout(tok, model, monkeypatch, **config):
    """One generation batch of 4 completions of a short and a long prompt; returns the keyword arguments (and the
    prompt ids, as `input_ids`) the trainer gave `multiplex_generate`, and the batch."""
    from datasets import Dataset

    import multiplex_trl.trainer as trainer_module

    args = _config(max_completion_length=12, num_generations=2, per_device_train_batch_size=4, **config)
    prompts = [[{"role": "user", "content": q}] for q in ("1+1?", "what is the sum of one and one?")]
    trainer = MultiplexGRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts * 2}),
        processing_class=tok,
    )
    seen = {}
    rollout = trainer_module.multiplex_generate

    def recording(model, input_ids, attention_mask, **kw):
        seen.update(kw, input_ids=input_ids, attention_mask=attention_mask)
        return rollout(model, input_ids, attention_mask, **kw)

    monkeypatch.setattr(trainer_module, "multiplex_generate", recording)
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(2)])
    return seen, batch


@pytest.mark.parametrize(
    "generation_kwargs",
    [{"top_k": 1, "do_sample": True}, {"top_p": 1e-6, "top_k": 50}, {"min_p": 1.0}],
    ids=["top_k", "top_p", "min_p"],
)
def test_generation_kwargs_set_the_rollouts_sampling(tok, model, monkeypatch, generation_kwargs):
    """TRL's generation_kwargs override top_p / top_k / min_p; the multiplex rollout ignored them. Each of these
    settings alone makes sampling greedy."""
    seen, batch = _recorded_rollout(tok, model, monkeypatch, generation_kwargs=generation_kwargs)
    args = _config(generation_kwargs=generation_kwargs)
    for key in ("top_p", "top_k", "min_p"):
        assert seen[key] == generation_kwargs.get(key, getattr(args, key)), key
    ids = batch["completion_ids"]
    assert (ids[:2] == ids[:1]).all() and (ids[2:] == ids[2:3]).all()  # top-k 1: greedy, one text a prompt
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


def test_a_special_token_marker_is_refused_and_the_named_fix_works(tmp_path):
    """A marker the tokenizer marks special vanishes from text decoded with skip_special_tokens=True (TRL's completions
    for the rewards, generate, eval): every answer would read as unclosed and score 0. Refused, and the fix the error
    names (tokenizer.json's `"special": false`) makes it accepted."""
    import json

    from transformers import AutoTokenizer

    from multiplex_trl.markers import thinking_end_ids
    from multiplex_trl.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["[/THINK]"]})
    with pytest.raises(
        ValueError, match=r"thinking_end='\[/THINK\]' is a special token of this tokenizer, so decoding"
    ):
        thinking_end_ids(tokenizer, "[/THINK]")
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    for token in saved["added_tokens"]:
        token["special"] = token["special"] and token["content"] != "[/THINK]"
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved))
    fixed = AutoTokenizer.from_pretrained(tmp_path)
    assert thinking_end_ids(fixed, "[/THINK]") == tokenizer.convert_tokens_to_ids(["[/THINK]"])
    assert (
        fixed.decode(fixed.encode("ab[/THINK]7", add_special_tokens=False), skip_special_tokens=True) == "ab[/THINK]7"
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


@pytest.mark.parametrize("name", ["rollout_func", "environment_factory"])
def test_custom_rollouts_are_refused_with_multiplex(tok, model, name):
    """TRL's rollout_func / environment_factory replace its generation, so the multiplex rollout would never run (the
    first step then failed on the missing slots): refused when the trainer is built."""
    with pytest.raises(ValueError, match=f"{name} is not supported with multiplex rollouts"):
        MultiplexGRPOTrainer(
            model=model,
            reward_funcs=lambda completions, **kw: [0.0],
            args=_config(),
            processing_class=tok,
            **{name: lambda *args, **kwargs: None},
        )


@pytest.mark.parametrize(
    "sharded",
    [{"fsdp": "full_shard"}, {"deepspeed": {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}}],
    ids=["fsdp", "zero3"],
)
def test_compiled_decode_is_refused_when_the_config_shards_parameters(monkeypatch, sharded):
    """FSDP or ZeRO-3 set in the config itself (not through `accelerate launch`'s environment) is refused too."""
    if "deepspeed" in sharded:
        pytest.importorskip("deepspeed")
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # set by an fsdp config: restored after the test
    try:
        _config(cache_implementation="static", **sharded)
        with pytest.raises(ValueError, match="multiplex_compile=True cannot run under DeepSpeed ZeRO-3 or FSDP"):
            _config(cache_implementation="static", multiplex_compile=True, **sharded)
    finally:
        unset_hf_deepspeed_config()  # a ZeRO-3 config makes later model loads ZeRO-3 inits in this process


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


def test_settings_trl_accepts_are_accepted():
    """The choices checked before the model loads are exactly TRL's: its spellings (and scale_rewards' booleans) pass,
    and vLLM at width 1 with the rollout's fields at their defaults is TRL's own path."""
    for level in ("token", "sequence"):
        _config(importance_sampling_level=level, loss_type="grpo")
    assert [_config(scale_rewards=v).scale_rewards for v in (True, False, "batch")] == ["group", "none", "batch"]
    _config(multi_objective_aggregation="normalize_then_sum")
    args = _config(multiplex_width=1, use_vllm=True, thinking_end="Answer:", reward_error="none")
    assert args.use_vllm and args.multiplex_width == 1


def test_async_callable_reward_is_awaited(tok, model):
    """A reward given as an instance whose `__call__` is async (TRL's `is_async_callable`) keeps TRL's async handling;
    wrapped in the synchronous guard it returned an unawaited coroutine (TypeError)."""
    from datasets import Dataset

    class Judge:
        async def __call__(self, completions, **kwargs):
            return [float(len(c[0]["content"])) for c in completions]

    args = _config(max_completion_length=12, num_generations=4, per_device_train_batch_size=4)
    prompts = [[{"role": "user", "content": "1+1?"}]] * 4
    trainer = MultiplexGRPOTrainer(
        model=model,
        reward_funcs=Judge(),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tok,
    )
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts])
    lengths = torch.tensor(
        [float(len(t)) for t in tok.batch_decode(batch["completion_ids"], skip_special_tokens=True)]
    )
    centred = lengths - lengths.mean()
    expected = centred / (lengths.std() + 1e-4)
    torch.testing.assert_close(batch["advantages"], expected, atol=1e-4, rtol=1e-4)


def test_tokenizer_is_loaded_at_the_models_revision(tiny_model_dir, monkeypatch):
    """Given a model path, the processing class comes from AutoProcessor at model_init_kwargs' revision, as TRL loads
    it (the tokenizer was read from the default branch while the model came from the asked revision)."""
    import transformers
    from datasets import Dataset

    seen = []
    real = transformers.AutoProcessor.from_pretrained.__func__

    def recording(cls, name, *a, **kw):
        seen.append(kw.pop("revision", "<none>"))  # a local folder has no revisions to load from
        return real(cls, name, *a, **kw)

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", classmethod(recording))
    MultiplexGRPOTrainer(
        model=tiny_model_dir,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=_config(model_init_kwargs={"revision": "v1.0"}),
        train_dataset=Dataset.from_dict({"prompt": ["1+1?"] * 8}),
    )
    assert seen and set(seen) == {"v1.0"}


def test_vision_language_model_path_is_refused_before_it_loads(tmp_path, monkeypatch):
    """A VLM given as a path gets a multimodal processor: refused before the model loads (it was accepted and its
    text model ran multiplex rollouts), as is one given with its processor."""
    import transformers
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from multiplex_trl.testing import tiny_tokenizer

    tok = tiny_tokenizer()  # its own: an image token is added
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    text = {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32}
    text.update(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<image>"))
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path)
    image_processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = LlavaProcessor(
        image_processor=image_processor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tok,
        chat_template=tok.chat_template,
        patch_size=14,
        image_token="<image>",
    )
    processor.save_pretrained(tmp_path)

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the processor was checked")

    monkeypatch.setattr("trl.trainer.grpo_trainer.create_model_from_path", no_load)
    for given in ({}, {"processing_class": processor}):
        with pytest.raises(ValueError, match="Vision-language models are not supported with multiplex rollouts"):
            MultiplexGRPOTrainer(
                model=str(tmp_path), reward_funcs=lambda completions, **kw: [0.0], args=_config(), **given
            )


def test_rollout_prompts_are_padded_to_pad_to_multiple_of(tok, model, monkeypatch):
    """pad_to_multiple_of pads the rollout's prompt batch as TRL pads its prompts (fewer shapes to compile)."""
    seen, batch = _recorded_rollout(tok, model, monkeypatch)
    assert seen["input_ids"].size(1) % 16 != 0  # otherwise the check below proves nothing
    longest = seen["attention_mask"].sum(-1).max()
    seen, batch = _recorded_rollout(tok, model, monkeypatch, pad_to_multiple_of=16)
    assert seen["input_ids"].size(1) % 16 == 0 and seen["attention_mask"].sum(-1).max() == longest
    assert (seen["attention_mask"][:, 0] == 0).all()  # left padding
    assert batch["completion_mask"].any()


def test_prompts_that_close_thinking_are_refused(model, monkeypatch):
    """A template that renders thinking already closed (Qwen3's enable_thinking=False) left no thinking phase, yet the
    rollout decoded and trained the answer as multiplex thinking: the kwarg is refused with the config, and a prompt
    ending with the marker when it is generated."""
    from multiplex_trl.testing import CHAT_TEMPLATE, tiny_tokenizer

    tok = tiny_tokenizer()  # its own: its chat template is changed
    with pytest.raises(ValueError, match="enable_thinking=False renders every prompt with thinking already closed"):
        _config(chat_template_kwargs='{"enable_thinking": false}')
    _config(chat_template_kwargs={"enable_thinking": True})
    _recorded_rollout(tok, model, monkeypatch)  # the template opens thinking: accepted
    opening = "{% if add_generation_prompt %}<|assistant|><think>{% endif %}"
    assert opening in CHAT_TEMPLATE
    tok.chat_template = CHAT_TEMPLATE.replace(opening, opening.replace("<think>", "<think></think>\n"))
    with pytest.raises(
        ValueError, match=r"a prompt already ends with thinking_end='</think>' \(\.\.\.'.*</think>\\n'\)"
    ):
        _recorded_rollout(tok, model, monkeypatch)
