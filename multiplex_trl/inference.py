"""Decoding with multiplex thinking, or another token-mixing rule of the same engine, at inference time.

    from multiplex_trl.inference import generate
    samples = generate("path/to/model", ["What is 7 * 6?"], width=3, num_samples=4, seed=0)
    print(samples[0][0].answer)
    generate("path/to/model", "What is 7 * 6?", mixer="soft")  # Soft Thinking at its paper settings

Multiplex decoding of a model never trained with it is the paper's Multiplex Thinking-I; width=1 is ordinary
sampling. `mixer` picks the token-mixing rule (`multiplex_trl.mixers`). Settings: explicit arguments win, then the
mixer's paper settings (Soft Thinking's), then the `multiplex_config.json` a model folder saved by multiplex training
carries, then the paper's rollout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import typing
from dataclasses import dataclass, fields

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import MultiplexGRPOConfig
from .hub import hub_offline, load_multiplex_settings
from .markers import check_prompts_open_thinking, closing_rule
from .mixers import MIXERS, Mixer, get_mixer
from .mixers.base import constructor_defaults
from .models import DEMO_MODEL_ALIASES, resolve_model_name_or_path
from .rollout import multiplex_generate
from .static_decode import check_decode_options, check_saved_model


DEFAULT_MAX_NEW_TOKENS = 4096  # the paper's maximum response length (thinking and answer together)
DEFAULT_BATCH_SIZE = 16
# Decoding defaults when neither the caller, the mixer's paper settings nor the model's multiplex_config.json set
# them (the paper's rollout). A mixer's own parameters default to its constructor's defaults.
DEFAULTS = {
    "mixer": "multiplex",
    "width": 3,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": None,
    "min_p": None,
    "thinking_end": "</think>",
    "max_thinking_tokens": None,
    "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
}


class UsageError(ValueError):
    """Bad input found before any model is loaded; the CLIs print it as one line."""


# --- mixers ---------------------------------------------------------------------------------------------------------


def check_mixer(name: str) -> None:
    """Refuse an unknown mixer name in one line that lists the known ones."""
    if name not in MIXERS:
        raise UsageError(f"Unknown mixer {name!r}; known: {sorted(MIXERS)}.")


def paper_settings(mixer: str) -> dict:
    """The settings the mixer's paper decodes with (`Soft.PAPER`: width, temperature, filters), {} when none."""
    return dict(getattr(MIXERS[mixer], "PAPER", {}))


def mixer_parameters(mixer: str) -> dict:
    """The mixer's own parameters (its constructor's, after `width`) and their defaults, paper settings first."""
    paper = paper_settings(mixer)
    return {name: paper.get(name, default) for name, default in constructor_defaults(mixer).items()}


def check_mixer_params(params: dict, mixers) -> None:
    """Refuse a mixer parameter that none of `mixers` takes, naming the mixers that do."""
    mixers = sorted(set(mixers))
    for name in params:
        if any(name in mixer_parameters(m) for m in mixers):
            continue
        owners = [m for m in sorted(MIXERS) if name in mixer_parameters(m)]
        if not owners:
            known = sorted({p for m in MIXERS for p in mixer_parameters(m)})
            raise UsageError(f"Unknown mixer parameter {name!r}; known: {known}.")
        raise UsageError(
            f"{name} is a parameter of mixer {' / '.join(map(repr, owners))}, not of {' / '.join(map(repr, mixers))}."
        )


# --- settings -------------------------------------------------------------------------------------------------------


@dataclass
class Decoding:
    """The settings of one decode (README: Inference, Token mixers): a mixer at width K, the filters, the budget."""

    mixer: str
    width: int
    mixer_params: dict  # the mixer's own parameters, e.g. {"merge": "weighted"} or {"gumbel_tau": 0.5}
    temperature: float
    top_p: float
    top_k: int | None
    min_p: float | None
    thinking_end: str
    max_thinking_tokens: int | None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def __post_init__(self):
        check_mixer(self.mixer)
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise UsageError(f"width must be an integer >= 1 (1 = ordinary sampling), got {self.width!r}.")
        if not self.temperature or self.temperature <= 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature!r}.")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise UsageError(f"min_p must be in [0, 1] or None, got {self.min_p!r}.")
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}.")
        if self.max_thinking_tokens is not None and self.max_thinking_tokens < 0:
            raise UsageError(f"max_thinking_tokens must be >= 0 or None, got {self.max_thinking_tokens!r}.")
        try:
            self.build_mixer()  # the mixer validates its own parameters
        except (TypeError, ValueError) as error:
            raise UsageError(f"mixer={self.mixer!r}: {error}") from None

    def build_mixer(self) -> Mixer:
        return get_mixer(self.mixer, self.width, **self.mixer_params)

    @property
    def name(self) -> str:
        """A readable method name: `discrete` (multiplex at K=1), else `mixer(K=.., params that differ from the
        mixer's defaults)`, e.g. `multiplex(K=3)`, `soft(K=10)`, `gumbel(K=3, gumbel_tau=0.3)`."""
        if self.mixer == "multiplex" and self.width == 1:
            return "discrete"
        defaults = mixer_parameters(self.mixer)
        changed = [f"{k}={v}" for k, v in self.mixer_params.items() if v != defaults.get(k)]
        return f"{self.mixer}({', '.join([f'K={self.width}', *changed])})"


def check_device(device: str | None) -> None:
    """Refuse a --device torch cannot parse, or CUDA on a machine without it, before any model loads."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a torch device: use cpu, cuda, cuda:<index>, ...") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu.")


def check_count(name: str, value: int) -> None:
    """Refuse a count below 1 (samples per prompt, rows per batch) as a UsageError, before any model loads."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be an integer >= 1, got {value!r}.")


def resolve_decoding(saved: dict | None, mixer_params: dict | None = None, **explicit) -> Decoding:
    """Each setting from: explicit (non-None) arguments, else the mixer's paper settings (`Soft.PAPER`), else the
    model's saved multiplex_config.json, else DEFAULTS (a mixer parameter: the mixer's own default).

    The paper settings go before the saved ones: those describe the rollout the model was trained with, another
    method's. `mixer_params` may hold parameters of other mixers; the chosen mixer takes the ones it knows.
    """
    saved = saved or {}
    explicit = {k: v for k, v in {**explicit, **(mixer_params or {})}.items() if v is not None}
    mixer = explicit.get("mixer") or saved.get("mixer") or DEFAULTS["mixer"]
    check_mixer(mixer)
    paper = paper_settings(mixer)

    def pick(name, default):
        for source in (explicit, paper, saved):
            if name in source:
                return source[name]
        return default

    values = {f.name: pick(f.name, DEFAULTS.get(f.name)) for f in fields(Decoding) if f.name != "mixer_params"}
    values["mixer"] = mixer
    params = {name: pick(name, default) for name, default in mixer_parameters(mixer).items()}
    return Decoding(**values, mixer_params=params)


@dataclass
class Sample:
    """One completion. `ids`/`weights` [T, K] are the stored slots (one-hot outside thinking: [tok, pad..], [1, 0..])."""

    text: str  # the decoded slot-0 completion (special tokens skipped)
    thinking: str  # the text before the end-of-thinking marker (all of it when thinking never closed)
    answer: str  # the text after the marker ("" when thinking never closed)
    ids: torch.LongTensor  # [T, K]
    weights: torch.FloatTensor  # [T, K]
    thinking_length: int  # positions decoded as mixed tokens (K merged slots)
    closed: bool  # thinking ended with the marker (sampled, or forced by max_thinking_tokens or the cold stop)
    mixer: str = "multiplex"  # the token-mixing rule that decoded it


# --- loading --------------------------------------------------------------------------------------------------------


def find_model(model: str, revision: str | None = None) -> str:
    """The folder or Hub id to load `model` from ("smollm2-135m" is the bundled demo model).

    Loads nothing and raises UsageError naming the path when there is no such model, so the CLIs can refuse early.
    With `revision` (a branch such as push_revisions' `step-<N>`, a tag or a commit of a Hub model), the files of that
    revision are fetched (or found in the cache when offline) and their local folder is returned.
    """
    expanded = os.path.expanduser(model)
    if revision is not None and (os.path.exists(expanded) or model.lower() in DEMO_MODEL_ALIASES):
        raise UsageError(
            f"--revision {revision!r} names a revision of a Hub model, but {model!r} is local: drop --revision, or "
            "pass the Hub id."
        )
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise UsageError(f"Model path {model!r} is a file: pass the folder that holds config.json.")
    if model.lower() in DEMO_MODEL_ALIASES:
        try:
            return resolve_model_name_or_path(model)
        except (ModuleNotFoundError, FileNotFoundError) as error:
            raise UsageError(str(error)) from error
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model) or model.startswith((".", "~")):
        raise UsageError(
            f"Model path {model!r} does not exist: pass a model folder, a Hub id (owner/name) or 'smollm2-135m'."
        )
    if revision is not None:
        return _fetch_revision(model, revision)
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise UsageError(
                f"Model {model!r} is neither a local folder nor in the Hub cache, and HF_HUB_OFFLINE is set: pass a "
                "local model folder, or go online once."
            )
    return model


def _fetch_revision(model: str, revision: str) -> str:
    """The local folder of `model` at `revision` (downloaded, or from the cache when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(model, revision=revision)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:  # unknown repo or revision, offline, no cache
        raise UsageError(
            f"Model {model!r} at revision {revision!r} could not be fetched ({type(error).__name__}): check the "
            "revision (push_revisions names its branches step-<N>), or go online once to cache it."
        ) from None


def load_model(path: str, device: str | torch.device | None = None):
    """Load (model, tokenizer) for decoding: eval mode, left padding, float32 on CPU and the saved dtype on GPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = "auto" if device.type == "cuda" else torch.float32  # CPU matmuls in bf16 are slow
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer


# --- decoding -------------------------------------------------------------------------------------------------------


def to_messages(prompt: str | list[dict], system_prompt: str | None = None) -> list[dict]:
    """A string becomes one user message; a message list is kept. `system_prompt` is prepended unless one exists."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def encode_prompts(tokenizer, conversations: list[list[dict]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-templated, left-padded prompts: (input_ids [B, P], attention_mask [B, P])."""
    if tokenizer.chat_template is None:
        raise UsageError("The tokenizer has no chat template: multiplex decoding needs one to format the prompt.")
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations]
    # The template already carries the special tokens (BOS included where the model uses one).
    enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def check_marker(tokenizer, prompts: list[list[int]], thinking_end: str):
    """The marker's ids and matcher (`closing_rule`), refusing a marker the tokenizer cannot use or prompts (ids,
    unpadded) that already close thinking, as a UsageError (the CLIs print it in one line)."""
    try:
        marker, automaton = closing_rule(tokenizer, thinking_end)
        check_prompts_open_thinking(tokenizer, prompts, thinking_end, marker)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return marker, automaton


def check_decodable(tokenizer, conversations: list[list[dict]], thinking_end: str) -> None:
    """What only the tokenizer can refuse (no chat template, an unusable marker, prompts that close thinking), for
    every prompt at once: eval checks it before it writes anything to its output folder."""
    check_marker(tokenizer, unpadded(*encode_prompts(tokenizer, conversations, "cpu")), thinking_end)


def unpadded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Each left-padded prompt's ids without its padding."""
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu())]


def eos_token_ids(model, tokenizer) -> list[int]:
    """The generation config's EOS ids plus the tokenizer's, as TRL's GRPOTrainer collects them."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return eos if tokenizer.eos_token_id in eos else [tokenizer.eos_token_id, *eos]


def decode_batch(
    model,
    tokenizer,
    conversations: list[list[dict]],
    decoding: Decoding,
    generator: torch.Generator | None = None,
    *,
    cache_implementation: str | None = None,
    compile: bool = False,
) -> list[Sample]:
    """One batched rollout of `decoding`'s mixer over `conversations` (one row each) -> one Sample per row."""
    device = next(model.parameters()).device
    input_ids, attention_mask = encode_prompts(tokenizer, conversations, device)
    prompts = unpadded(input_ids, attention_mask)
    marker, automaton = check_marker(tokenizer, prompts, decoding.thinking_end)
    with global_rng_from(generator):
        rollout = multiplex_generate(
            model,
            input_ids,
            attention_mask,
            width=decoding.width,
            mixer=decoding.build_mixer(),
            temperature=decoding.temperature,
            top_p=decoding.top_p,
            top_k=decoding.top_k,
            min_p=decoding.min_p,
            max_new_tokens=decoding.max_new_tokens,
            thinking_end_ids=marker,
            thinking_end_automaton=automaton,
            eos_token_ids=eos_token_ids(model, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            max_thinking_tokens=decoding.max_thinking_tokens,
            generator=generator,
            cache_implementation=cache_implementation,
            compile=compile,
        )

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    samples = []
    for row, length in enumerate(rollout.lengths()):
        ids, weights = rollout.ids[row, :length].cpu(), rollout.weights[row, :length].float().cpu()
        text = decode(ids[:, 0].tolist())
        # The rollout closed thinking at the first place the text writes the marker: split there, as the rewards do.
        thinking, found, answer = (
            text.partition(decoding.thinking_end) if bool(rollout.closed[row]) else (text, "", "")
        )
        samples.append(
            Sample(
                text=text,
                thinking=thinking,
                answer=answer,
                ids=ids,
                weights=weights,
                thinking_length=int(rollout.thinking_mask[row].sum()),
                closed=bool(found),
                mixer=decoding.mixer,
            )
        )
    return samples


def make_generator(seed: int | None, device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


@contextlib.contextmanager
def global_rng_from(generator: torch.Generator | None):
    """Seed torch's global RNG from `generator` inside the block and restore it after, so that `seed` also fixes a
    mixer that draws from the global RNG (dirichlet: torch's gamma sampler takes no generator)."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def generate(
    model_or_path,
    prompts,
    *,
    tokenizer=None,
    mixer: str | None = None,
    width: int | None = None,
    merge: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    thinking_end: str | None = None,
    max_thinking_tokens: int | None = None,
    num_samples: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int | None = None,
    system_prompt: str | None = None,
    device: str | None = None,
    cache_implementation: str | None = None,
    compile: bool = False,
    revision: str | None = None,
    **mixer_params,
) -> list[list[Sample]]:
    """Sample `num_samples` completions per prompt; returns samples[prompt][sample].

    `model_or_path`: a model folder, Hub id or "smollm2-135m" (loads model and tokenizer), or a loaded model (then
    pass `tokenizer`). `prompts`: a string, a message list, or a list of either; strings become one user message.
    `mixer`: the token-mixing rule of the thinking phase, one of `multiplex_trl.mixers.MIXERS`: "multiplex" (the
    default; `merge` "weighted" | "averaged"), "soft" (Soft Thinking, deterministic thinking; `cold_stop_entropy`,
    `cold_stop_steps`), "gumbel" (`gumbel_tau`), "dirichlet" (`dirichlet_gamma`), "mot_distinct". A mixer's own
    parameters are keyword arguments (`**mixer_params`); one the mixer does not take is refused.
    Settings left as None come from, in order: the mixer's paper settings (mixer="soft": Soft Thinking's `Soft.PAPER`,
    K=10, temperature 0.6, top-p 0.95, top-k 30, min-p 0.001), the folder's multiplex_config.json (paths only), the
    paper's multiplex rollout (K=3, weighted, temperature 1, top-p 1, marker "</think>").
    `cache_implementation="static"` decodes with a static KV cache and `compile=True` compiles its decode step (CUDA
    graphs on a GPU): same rollouts up to rounding, for long generations on a GPU (bench/results/rollout*.md).
    `revision`: a branch (push_revisions' `step-<N>`), tag or commit of a Hub model id.
    """
    check_count("num_samples", num_samples)
    check_count("batch_size", batch_size)
    check_engine(cache_implementation, compile)
    if isinstance(model_or_path, (str, os.PathLike)):
        path = find_model(str(model_or_path), revision)
        check_engine(cache_implementation, compile, path, max_new_tokens)  # the model's window, before it loads
        saved = load_multiplex_settings(path)
    else:
        model, saved = model_or_path, None
        if tokenizer is None:
            raise ValueError("generate() with a loaded model needs `tokenizer=`.")
        if revision is not None:
            raise ValueError("generate() with a loaded model takes no `revision=` (it names a Hub model's files).")
    given = {k: v for k, v in {"merge": merge, **mixer_params}.items() if v is not None}
    decoding = resolve_decoding(
        saved,
        given,
        mixer=mixer,
        width=width,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        thinking_end=thinking_end,
        max_thinking_tokens=max_thinking_tokens,
        max_new_tokens=max_new_tokens,
    )
    check_mixer_params(given, [decoding.mixer])
    if isinstance(model_or_path, (str, os.PathLike)):  # loaded only once the settings are known to be good
        model, loaded_tokenizer = load_model(path, device)
        tokenizer = tokenizer or loaded_tokenizer
    return decode_prompts(
        model,
        tokenizer,
        prompts,
        decoding,
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        system_prompt=system_prompt,
        cache_implementation=cache_implementation,
        compile=compile,
    )


def check_engine(
    cache_implementation: str | None, compile: bool, path: str | None = None, max_new_tokens: int = 0
) -> None:
    """The decode-loop options, checked before any model loads (UsageError: the CLIs print it in one line).

    With `path`, the static cache is also checked against the model's config (`static_decode.check_saved_model`:
    attention it cannot decode; for --compile, a sliding window that a one-token prompt plus `max_new_tokens`
    overflows; the rollout checks the real prompts again).
    """
    try:
        check_decode_options(cache_implementation, compile)
        if path is not None:
            check_saved_model(path, cache_implementation, compile, 1 + max_new_tokens)
    except ValueError as error:
        raise UsageError(str(error)) from None


def decode_prompts(
    model,
    tokenizer,
    prompts,
    decoding: Decoding,
    *,
    num_samples: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int | None = None,
    system_prompt: str | None = None,
    cache_implementation: str | None = None,
    compile: bool = False,
) -> list[list[Sample]]:
    """`generate` with resolved settings and a loaded model: samples[prompt][sample]."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]  # one prompt
    conversations = [to_messages(p, system_prompt) for p in prompts]
    # Rows are (prompt, sample) pairs in order; a batch may mix prompts (left padding keeps them aligned).
    rows = [(p, s) for p in range(len(conversations)) for s in range(num_samples)]
    generator = make_generator(seed, next(model.parameters()).device)
    results: list[list[Sample]] = [[] for _ in conversations]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        samples = decode_batch(
            model,
            tokenizer,
            [conversations[p] for p, _ in chunk],
            decoding,
            generator,
            cache_implementation=cache_implementation,
            compile=compile,
        )
        for (p, _), sample in zip(chunk, samples):
            results[p].append(sample)
    return results


def format_branches(sample: Sample, tokenizer, digits: int = 2) -> str:
    """The completion with every branching position written as `[a:0.50|b:0.30|c:0.20]` (distinct slots, weights).

    Positions where all K slots agree read as plain text; weights of a token drawn in several slots are summed.
    """
    parts, plain = [], []
    for ids, weights in zip(sample.ids.tolist(), sample.weights.tolist()):
        candidates: dict[int, float] = {}
        for tok, w in zip(ids, weights):
            if w > 0:
                candidates[tok] = candidates.get(tok, 0.0) + w
        if len(candidates) <= 1:
            plain.append(ids[0])
            continue
        if plain:  # decode runs of plain tokens together so multi-token characters stay whole
            parts.append(tokenizer.decode(plain, skip_special_tokens=True))
            plain = []
        options = "|".join(
            f"{tokenizer.decode([tok])!r}"[1:-1] + f":{w:.{digits}f}"  # repr: newlines and tabs stay visible
            for tok, w in candidates.items()
        )
        parts.append(f"[{options}]")
    if plain:
        parts.append(tokenizer.decode(plain, skip_special_tokens=True))
    return "".join(parts)


# --- CLI ------------------------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and --revision, as generate and eval take them."""
    parser.add_argument("--model", required=True, help="Model folder, Hub id, or 'smollm2-135m'.")
    parser.add_argument(
        "--revision", help="Branch, tag or commit of a Hub model (push_revisions pushes step-<N> branches)."
    )


def add_decoding_arguments(parser: argparse.ArgumentParser, multi: bool = False) -> None:
    """Decoding flags shared by `generate` and `eval` (None = the mixer's paper settings, else the model's
    multiplex_config.json, else the paper's rollout). With `multi`, --mixer and --width repeat (eval's methods)."""
    repeat = ", repeat to compare methods side by side" if multi else ""
    parser.add_argument(
        "--mixer",
        action="append" if multi else "store",
        help=f"Token-mixing rule of the thinking phase, one of {sorted(MIXERS)}{repeat}. 'soft' (Soft Thinking) "
        "takes its paper settings for whatever is left unset. Default: the model's saved mixer, else multiplex.",
    )
    parser.add_argument(
        "--width",
        type=int,
        action="append" if multi else "store",
        help=f"Width K: slots per thinking position (multiplex at K=1 = ordinary sampling){repeat}. "
        f"Default: {_paper_note('width')}the model's multiplex_config.json, else 3.",
    )
    parser.add_argument(
        "--merge", choices=["weighted", "averaged"], help="mixer=multiplex: how the K draws merge. Default: weighted."
    )
    add_mixer_parameter_arguments(parser)
    for flag, kind, what, default in [
        ("--temperature", float, "Sampling temperature", "1.0"),
        ("--top-p", float, "Nucleus filter", "1.0"),
        ("--top-k", int, "Top-k filter", "none"),
        ("--min-p", float, "Min-p filter", "none"),
    ]:
        parser.add_argument(
            flag, type=kind, help=f"{what}. Default: {_paper_note(flag[2:].replace('-', '_'))}saved, else {default}."
        )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"Thinking and answer tokens together (default {DEFAULT_MAX_NEW_TOKENS}, the paper's).",
    )
    parser.add_argument("--thinking-end", help="End-of-thinking marker. Default: saved, else '</think>'.")
    parser.add_argument(
        "--max-thinking-tokens", type=int, help="Force the marker after this many thinking positions. Default: saved."
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="Rows decoded together.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling generator.")
    parser.add_argument("--system-prompt", help="Optional system message.")
    parser.add_argument("--device", help="cuda, cpu, ... Default: cuda when available.")
    parser.add_argument(
        "--cache-implementation",
        choices=["dynamic", "static"],
        help="KV cache of the decode loop: 'dynamic' (default; finished rows leave the batch) or 'static' "
        "(preallocated, fixed shapes; needed by --compile).",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Compile the decode step with torch.compile (CUDA graphs on a GPU); needs --cache-implementation static.",
    )


def _paper_note(setting: str) -> str:
    """'the mixer's paper setting (soft: 0.6), else ' for a setting some mixer's paper fixes, else ''."""
    papers = [f"{m}: {paper_settings(m)[setting]}" for m in sorted(MIXERS) if setting in paper_settings(m)]
    return f"the mixer's paper setting ({', '.join(papers)}), else " if papers else ""


def add_mixer_parameter_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per mixer parameter (`--gumbel-tau`, ...), read off the mixers' constructors; the help is the
    MultiplexGRPOConfig field's where there is one. A new mixer's parameters get their flags with no edit here."""
    config_fields = MultiplexGRPOConfig.__dataclass_fields__
    for mixer in sorted(MIXERS):
        hints = typing.get_type_hints(MIXERS[mixer].__init__)
        for name, default in mixer_parameters(mixer).items():
            if name == "merge" or any(a.dest == name for a in parser._actions):  # --merge has its own flag
                continue
            kind = next((t for t in typing.get_args(hints.get(name)) if t is not type(None)), hints.get(name, str))
            doc = config_fields.get(name, config_fields.get(f"multiplex_{name}"))
            help = doc.metadata.get("help", "") if doc is not None else f"mixer={mixer!r}: {name}."
            default = "none" if default is None else default
            parser.add_argument(
                "--" + name.replace("_", "-"), dest=name, type=kind, help=f"{help} Default: {default}."
            )


def mixer_arguments(args: argparse.Namespace) -> dict:
    """The mixer parameters set on the command line (merge included)."""
    names = {name for mixer in MIXERS for name in mixer_parameters(mixer)}
    return {name: getattr(args, name) for name in sorted(names) if getattr(args, name, None) is not None}


def decoding_arguments(args: argparse.Namespace) -> dict:
    """The decoding settings set on the command line, as `resolve_decoding` keywords (mixer and width excluded)."""
    return {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "thinking_end": args.thinking_end,
        "max_thinking_tokens": args.max_thinking_tokens,
        "max_new_tokens": args.max_new_tokens,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multiplex-trl generate",
        description="Answer a prompt with multiplex decoding (K merged draws per thinking position) or another "
        "token-mixing rule (--mixer).",
    )
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, action="append", help="User message (repeat for several).")
    parser.add_argument("--num-samples", type=int, default=1, help="Completions per prompt.")
    parser.add_argument(
        "--show-branches", action="store_true", help="Print the completion with each branching position's K slots."
    )
    add_decoding_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`multiplex-trl generate`: print the answer of each sample (and with --show-branches the branched thinking)."""
    args = build_parser().parse_args(argv)
    try:
        check_count("--num-samples", args.num_samples)
        check_count("--batch-size", args.batch_size)
        check_device(args.device)
        path = find_model(args.model, args.revision)
        given = mixer_arguments(args)
        decoding = resolve_decoding(
            load_multiplex_settings(path), given, mixer=args.mixer, width=args.width, **decoding_arguments(args)
        )
        check_mixer_params(given, [decoding.mixer])
        check_engine(args.cache_implementation, args.compile, path, decoding.max_new_tokens)
    except UsageError as error:
        print(f"multiplex-trl generate: error: {error}", file=sys.stderr)
        return 2
    model, tokenizer = load_model(path, args.device)
    try:
        results = decode_prompts(
            model,
            tokenizer,
            args.prompt,
            decoding,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            seed=args.seed,
            system_prompt=args.system_prompt,
            cache_implementation=args.cache_implementation,
            compile=args.compile,
        )
    except UsageError as error:  # what only the loaded tokenizer shows (no chat template, a prompt closing thinking)
        print(f"multiplex-trl generate: error: {error}", file=sys.stderr)
        return 2
    for p, samples in enumerate(results):
        for s, sample in enumerate(samples):
            if len(results) > 1 or len(samples) > 1:
                print(f"=== prompt {p}, sample {s}")
            if args.show_branches:
                print(format_branches(sample, tokenizer))
                print(f"--- {decoding.name}: {sample.thinking_length} mixed thinking positions")
            if sample.closed:
                print(sample.answer.strip())
                continue
            # No marker: say why, and show the text so nothing is lost (rewards and eval score it 0).
            why = "ended" if sample.ids.size(0) < decoding.max_new_tokens else "reached --max-new-tokens"
            print(f"(no answer: the model {why} before closing its thinking with {decoding.thinking_end!r})")
            if not args.show_branches:
                print(sample.text.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
