"""MultiplexGRPOTrainer: TRL's GRPOTrainer with the multiplex rollout and the factorised log-prob wired in.

Six hooks are overridden (`OVERRIDDEN_HOOKS`); everything else (rewards, advantages, every loss type, KL, clipping,
logging) is TRL's:
- `_generate_single_turn`: runs `multiplex_generate` and keeps the slots of this generation batch;
- `_generate`: marks budget-forced marker tokens as not-from-the-policy (TRL's `tool_mask`), so they get no loss;
- `_generate_and_score_completions`: adds the slots to the batch TRL shuffles and splits, logs multiplex metrics;
- `_get_per_token_logps_and_entropies`: scores the slots with `multiplex_logprobs` (policy, old policy, reference);
- `_compute_loss`: hands the batch's slots to that scoring pass, and refuses a non-finite loss before backward;
- `_calculate_rewards`: stops the run when every reward is None (nothing to learn from).
"""

from __future__ import annotations

import functools
import signal
import threading

import torch
import torch.distributed as dist
from transformers import AutoProcessor, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import is_async_callable, pad

from .config import MultiplexGRPOConfig
from .logprobs import add_multiplex_head, multiplex_logprobs, router_aux_loss_function, unwrap_model
from .markers import check_prompts_open_thinking, closing_rule
from .mixers import mixer_from_config
from .rewards import set_thinking_end
from .rollout import multiplex_generate
from .static_decode import check_decode_model


# TRL hooks this trainer overrides, with the parameters it relies on (tests/test_trainer.py checks them against TRL).
OVERRIDDEN_HOOKS = {
    "_generate_single_turn": ["self", "prompt_ids", "images", "multimodal_fields", "num_generations"],
    "_generate": ["self", "prompts"],
    "_generate_and_score_completions": ["self", "inputs"],
    "_get_per_token_logps_and_entropies": [
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
        "compute_aux_loss",
    ],
    "_compute_loss": ["self", "model", "inputs"],
    "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
}


def _pad_time(x: torch.Tensor, length: int, value) -> torch.Tensor:
    """Right-pad dim 1 of `x` to `length`."""
    if x.size(1) >= length:
        return x[:, :length]
    shape = list(x.shape)
    shape[1] = length - x.size(1)
    return torch.cat([x, x.new_full(shape, value)], dim=1)


def guard_reward(func, policy: str):
    """Wrap a reward function so an exception names the function and the first failing sample.

    policy 'raise' re-raises; 'none' scores the failing samples None (others keep their rewards). An async reward
    function (TRL's `is_async_callable`) gets an async wrapper, so TRL still awaits it on its event loop.
    """
    name = getattr(func, "__name__", type(func).__name__)

    def per_sample(completions, kwargs):
        """(sample index, kwargs of that sample alone) for each sample of the batch."""
        n = len(completions)
        batched = {k for k, v in kwargs.items() if isinstance(v, list) and len(v) == n}
        for i in range(n):
            yield i, {k: (v[i : i + 1] if k in batched else v) for k, v in kwargs.items()}

    def failed(i, error):  # a sample that raised alone: its reward under `policy`
        if policy == "raise":
            raise RuntimeError(
                f"reward function '{name}' raised on sample {i} of the batch: {error!r}; fix the function, or set "
                "reward_error='none' to score such samples None."
            ) from error
        return None

    def batch_failed(batch_error, rewards):  # the batch call failed but every single call passed
        if policy == "raise":
            raise RuntimeError(f"reward function '{name}' raised on the batch: {batch_error!r}") from batch_error
        return rewards

    if is_async_callable(func):

        @functools.wraps(func)
        async def guarded_async(*args, completions, **kwargs):
            try:
                return await func(*args, completions=completions, **kwargs)
            except Exception as batch_error:  # locate the sample by scoring one completion at a time
                rewards = []
                for i, one in per_sample(completions, kwargs):
                    try:
                        rewards.append((await func(*args, completions=completions[i : i + 1], **one))[0])
                    except Exception as error:
                        rewards.append(failed(i, error))
                return batch_failed(batch_error, rewards)

        return guarded_async

    @functools.wraps(func)
    def guarded(*args, completions, **kwargs):
        try:
            return func(*args, completions=completions, **kwargs)
        except Exception as batch_error:  # locate the sample by scoring one completion at a time
            rewards = []
            for i, one in per_sample(completions, kwargs):
                try:
                    rewards.append(func(*args, completions=completions[i : i + 1], **one)[0])
                except Exception as error:
                    rewards.append(failed(i, error))
            return batch_failed(batch_error, rewards)

    return guarded


class SaveOnSigterm(TrainerCallback):
    """On SIGTERM (preemption, `kill`), finish the current step, save a checkpoint and stop cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.requested = False  # a signal of an earlier train() call stopped that call, not this one
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # All ranks stop at the same step: one that saw the signal alone would save while the others went on
            # into the next step's collectives (a mismatch that kills the run without a checkpoint).
            flag = torch.tensor([float(self.requested)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.requested = bool(flag.item())
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def drop_repeated_input_grad_hooks(model: torch.nn.Module) -> int:
    """Keep one of the identical "inputs require grad" hooks on each module; returns how many were dropped.

    transformers registers one each time gradient checkpointing is turned on (`enable_input_require_grads`) and, for
    a model without an integrated adapter, never removes it when it is turned off. TRL turns it off and on around
    every generation and scoring pass, so without this the embeddings gain two hooks a step, every one of them run at
    every forward: a per-step cost that grows with the length of the run (TRL's own GRPOTrainer too). The newest
    hook, the one transformers keeps a handle to, stays.
    """
    dropped = 0
    for module in model.modules():
        hooks = module._forward_hooks
        repeated = [key for key, hook in hooks.items() if getattr(hook, "__name__", "") == "make_inputs_require_grads"]
        for key in repeated[:-1]:
            del hooks[key]
            dropped += 1
    return dropped


class MultiplexGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose rollouts think in multiplex tokens (K merged draws per thinking position)."""

    _tag_names = ["trl", "grpo", "multiplex-thinking"]

    def __init__(self, model, reward_funcs=None, args: MultiplexGRPOConfig | None = None, **kwargs):
        if args is None:
            args = MultiplexGRPOConfig(output_dir="multiplex-grpo")
        if not isinstance(args, MultiplexGRPOConfig):
            raise TypeError("MultiplexGRPOTrainer needs args=MultiplexGRPOConfig(...), got a plain GRPOConfig.")
        multiplex = args.multiplex_width > 1 or not args.use_vllm
        if multiplex:
            for name in ("tools", "rollout_func", "environment_factory"):
                if kwargs.get(name):
                    raise ValueError(
                        f"{name} is not supported with multiplex rollouts: remove it, or use trl.GRPOTrainer."
                    )
        # The marker is checked before any model is loaded.
        tokenizer = kwargs.get("processing_class")
        if tokenizer is None and isinstance(
            model, str
        ):  # loaded as TRL loads it: AutoProcessor at the model's revision
            tokenizer = AutoProcessor.from_pretrained(
                model,
                revision=(args.model_init_kwargs or {}).get("revision"),
                padding_side="left",
                truncation_side="left",
                trust_remote_code=args.trust_remote_code,
            )
            kwargs["processing_class"] = tokenizer
        if multiplex and isinstance(tokenizer, ProcessorMixin):
            raise ValueError(
                "Vision-language models are not supported with multiplex rollouts (the model came with a multimodal "
                "processor): use a text-only causal LM, or trl.GRPOTrainer."
            )
        if not isinstance(tokenizer, PreTrainedTokenizerBase) and tokenizer is not None:
            tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        if tokenizer is not None:  # the marker is checked before a model given as a path loads
            closing_rule(tokenizer, args.thinking_end)
        set_thinking_end(args.thinking_end)  # the bundled rewards grade the text after this marker

        super().__init__(model, reward_funcs, args, **kwargs)

        self.multiplex = multiplex
        self.mixer = mixer_from_config(args)
        for key, value in args.rollout_filters().items():  # generation_kwargs override the fields, as in TRL
            setattr(self, key, value)
        # A text marker's matcher (None for one token), kept where the rollout runs: it is [marker bytes + 1, vocab].
        self.thinking_end_ids, table = closing_rule(self._tokenizer, args.thinking_end)
        self.thinking_end_automaton = None if table is None else table.to(self.accelerator.device)
        if self.multiplex:
            if self.aux_loss_enabled and router_aux_loss_function(unwrap_model(self.model)) is None:
                raise ValueError(
                    f"the MoE router aux loss of {type(unwrap_model(self.model)).__name__} is computed in a way the "
                    "multiplex log-prob pass does not reproduce: set router_aux_loss_coef=0."
                )
            try:
                embeddings = unwrap_model(self.model).get_input_embeddings()
            except NotImplementedError:
                embeddings = None
            if not isinstance(embeddings, torch.nn.Module):
                raise ValueError(
                    "the model has no input embeddings (get_input_embeddings() returned nothing): multiplex rollouts "
                    "feed merged token embeddings, so use a causal LM with an embedding layer."
                )
            # Before training: attention the static cache cannot decode, a window that the shortest prompt overflows
            check_decode_model(
                unwrap_model(self.model).config,
                args.cache_implementation,
                args.multiplex_compile,
                1 + args.max_completion_length,
            )
            add_multiplex_head(unwrap_model(self.model))
            if self.ref_model is not None:
                add_multiplex_head(unwrap_model(self.ref_model))
        self.reward_funcs = [  # reward models keep TRL's own handling; async functions get an async guard
            f if isinstance(f, torch.nn.Module) else guard_reward(f, args.reward_error) for f in self.reward_funcs
        ]
        self._sigterm = SaveOnSigterm()
        self.add_callback(self._sigterm)
        self._rollout = None  # slots of the current generation batch, set by _generate_single_turn
        self._active_slots = None  # (ids, weights, thinking_mask) of the rows being scored

    @property
    def preempted(self) -> bool:
        """Whether the last `train()` stopped early on SIGTERM (its checkpoint saved)."""
        return self._sigterm.requested

    # --- generation ---------------------------------------------------------------------------------------------

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if not self.multiplex:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        device = self.accelerator.device
        limit = getattr(unwrap_model(self.model).config.get_text_config(), "max_position_embeddings", None)
        longest = max(len(ids) for ids in prompt_ids)
        if limit is not None and longest + self.max_completion_length > limit:
            raise ValueError(
                f"a prompt of {longest} tokens plus max_completion_length={self.max_completion_length} exceeds the "
                f"model's max_position_embeddings={limit}: shorten the prompts or lower max_completion_length."
            )
        check_prompts_open_thinking(self._tokenizer, prompt_ids, self.args.thinking_end, self.thinking_end_ids)
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        padding = {"padding_side": "left", "pad_to_multiple_of": self.pad_to_multiple_of}  # as TRL pads prompts
        input_ids = pad(prompts, padding_value=self._tokenizer.pad_token_id, **padding).to(device)
        attention_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, **padding).to(device)
        args = self.args
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            try:
                rollout = self._multiplex_generate(unwrapped_model, input_ids, attention_mask)
            except (RuntimeError, ValueError) as error:
                # torch.multinomial on NaN/inf probabilities (RuntimeError); torch's Dirichlet (the dirichlet mixer)
                # on NaN concentrations (ValueError: "... but found invalid values")
                if not any(s in str(error) for s in ("multinomial", "probability", "found invalid values")):
                    raise
                raise FloatingPointError(self._non_finite("logits during the rollout")) from error
        if not (torch.isfinite(rollout.weights).all() and torch.isfinite(rollout.logprobs).all()):
            raise FloatingPointError(self._non_finite("merge weights or log-probs in the rollout"))
        self._rollout = rollout
        # TRL scores the old policy and the reference right after generation: route those passes to the slots.
        self._active_slots = (rollout.ids, rollout.weights, rollout.thinking_mask)
        completion_ids = [row[:n].tolist() for row, n in zip(rollout.completion_ids.cpu(), rollout.lengths())]
        return completion_ids, None

    def _non_finite(self, what: str) -> str:
        return (
            f"non-finite {what} at step {self.state.global_step}: the weights were not updated with it; lower the "
            "learning rate or use bf16 instead of fp16, and resume from the last checkpoint."
        )

    def _multiplex_generate(self, model, input_ids, attention_mask):
        args = self.args
        return multiplex_generate(
            model,
            input_ids,
            attention_mask,
            width=args.multiplex_width,
            merge=args.multiplex_merge,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            max_new_tokens=self.max_completion_length,
            thinking_end_ids=self.thinking_end_ids,
            thinking_end_automaton=self.thinking_end_automaton,
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self._tokenizer.pad_token_id,
            max_thinking_tokens=args.max_thinking_tokens,
            mixer=self.mixer,
            cache_implementation=args.cache_implementation,
            compile=args.multiplex_compile,
        )

    def _generate(self, prompts):
        out = list(super()._generate(prompts))
        if self.multiplex and self._rollout is not None and out[2] is None and self._rollout.forced_mask.any():
            # Marker tokens forced by the thinking budget were not sampled from the policy: no loss on them.
            forced = self._rollout.forced_mask.cpu()
            out[2] = [(~f[:n]).long().tolist() for f, n in zip(forced, self._rollout.lengths())]
        return tuple(out)

    def _generate_and_score_completions(self, inputs):
        try:
            if not self.multiplex:
                return super()._generate_and_score_completions(inputs)
            output = super()._generate_and_score_completions(inputs)
            length = output["completion_ids"].size(1)
            output["multiplex_ids"] = _pad_time(self._rollout.ids, length, self._tokenizer.pad_token_id)
            output["multiplex_weights"] = _pad_time(self._rollout.weights, length, 0.0)
            output["thinking_mask"] = _pad_time(self._rollout.thinking_mask, length, False)
            self._log_multiplex_metrics(self._rollout)
        finally:
            self._rollout = self._active_slots = None
            # TRL turned gradient checkpointing off and on again here: drop the hooks that left behind
            drop_repeated_input_grad_hooks(unwrap_model(self.model))
        return output

    # --- scoring ------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if self.multiplex:
            self._active_slots = (inputs["multiplex_ids"], inputs["multiplex_weights"], inputs["thinking_mask"])
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._active_slots = None
        if not torch.isfinite(loss):  # raised before backward, so the weights never see it
            raise FloatingPointError(self._non_finite("loss"))
        return loss

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if torch.isnan(rewards).all():
            raise ValueError(
                f"every reward function returned None for every completion at step {self.state.global_step}, so "
                "there is nothing to learn from: check that the reward functions match this dataset's columns."
            )
        return rewards

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **kwargs,
    ):
        if self._active_slots is None:
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size,
                compute_entropy,
                compute_aux_loss,
                **kwargs,
            )
        ids, weights, thinking = self._active_slots
        ids = _pad_time(ids, logits_to_keep, self._tokenizer.pad_token_id)
        weights = _pad_time(weights, logits_to_keep, 0.0)
        thinking = _pad_time(thinking, logits_to_keep, False)
        prompt_len = input_ids.size(1) - logits_to_keep
        with self.accelerator.autocast():
            out = multiplex_logprobs(
                model,
                input_ids[:, :prompt_len],
                attention_mask[:, :prompt_len],
                ids,
                weights,
                attention_mask[:, prompt_len:],
                temperature=self.temperature,
                thinking_mask=thinking,
                compute_entropy=compute_entropy,
                batch_size=batch_size,
                mixer=self.mixer,
                cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
                compute_aux_loss=compute_aux_loss,
            )
        if compute_aux_loss:
            return out
        logps, entropies = out if compute_entropy else (out, None)
        return logps, entropies, None

    def save_model(self, output_dir=None, _internal_call=False):
        """The Trainer's save (checkpoints call it too) with multiplex_config.json beside the weights, written first so
        a push from inside the save carries it."""
        if self.args.should_save:
            from .hub import save_multiplex_settings

            save_multiplex_settings(output_dir if output_dir is not None else self.args.output_dir, self.args)
        super().save_model(output_dir, _internal_call)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card plus the multiplex section and multiplex_config.json, so a plain `push_to_hub()` carries them."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            from .hub import describe_model

            describe_model(self.args.output_dir, self.args, model_name)

    # --- metrics ------------------------------------------------------------------------------------------------

    def _log_multiplex_metrics(self, rollout) -> None:
        mode = "train" if self.model.training else "eval"
        think = rollout.thinking_mask
        ids = rollout.ids
        branched = (ids != ids[..., :1]).any(-1) & think
        distinct = (ids.unsqueeze(-1) == ids.unsqueeze(-2)).triu(1).any(-2).logical_not().sum(-1).float()
        closed = rollout.closed & ~rollout.forced_mask.any(-1)
        local = torch.stack(
            [
                branched.sum().float(),
                think.sum().float(),
                (distinct * think).sum(),
                closed.sum().float(),
                torch.tensor(float(ids.size(0)), device=ids.device),
            ]
        )
        total = self.accelerator.reduce(local, reduction="sum")
        n_think, n_rows = total[1].clamp(min=1.0), total[4].clamp(min=1.0)
        metrics = self._metrics[mode]
        metrics["multiplex/branch_rate"].append((total[0] / n_think).item())
        metrics["multiplex/distinct_per_step"].append((total[2] / n_think).item())
        metrics["multiplex/thinking_length"].append((total[1] / n_rows).item())
        metrics["multiplex/closed_thinking_rate"].append((total[3] / n_rows).item())
