"""What a trained multiplex model carries with it, and how it reaches the Hub.

- `multiplex_config.json` next to `config.json`: the rollout settings (mixer, width, merge, marker, sampling) a model
  was trained with, so multiplex inference never has to guess them.
- A model-card section naming the method, linking the paper and listing those settings.
- The end-of-training push (adapter by default for LoRA, merged weights on request) and a callback that pushes every
  saved checkpoint to its own branch `step-<N>`.
No hub token is ever written into the card or the JSON: both are built from an explicit list of fields.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import MultiplexGRPOConfig
from .mixers import MIXERS


PAPER_ID = "2601.08808"
PAPER_URL = f"https://arxiv.org/abs/{PAPER_ID}"
PAPER_TITLE = "Multiplex Thinking: Reasoning via Token-wise Branch-and-Merge"
SETTINGS_FILE = "multiplex_config.json"
# Decoding settings saved besides the mixer and its own parameters; the keys are the names `generate` takes.
DECODING_FIELDS = {
    "width": "multiplex_width",
    "thinking_end": "thinking_end",
    "max_thinking_tokens": "max_thinking_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
}
CARD_START, CARD_END = "<!-- multiplex-trl:start -->", "<!-- multiplex-trl:end -->"
# Checkpoint files a revision push leaves out: optimizer/scheduler/RNG state, DeepSpeed shards, pickled arguments.
CHECKPOINT_IGNORE = [
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*",
    "training_args.bin",
    "global_step*",
    "latest",
    "zero_to_*.py",
]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
MERGED_DIR = "merged"  # <output_dir>/merged holds the merged LoRA weights when push_merged is set
_TRUE = {"1", "ON", "YES", "TRUE"}


# --- settings ---------------------------------------------------------------------------------------------------


def multiplex_settings(args: MultiplexGRPOConfig) -> dict:
    """The rollout settings of `args` as saved in multiplex_config.json: mixer, its parameters, decoding settings."""
    mixer = getattr(args, "mixer", "multiplex")
    settings = {"mixer": mixer}
    # A mixer's constructor parameter `p` comes from the config field `p` or `multiplex_p` (as mixer_from_config).
    for p in list(inspect.signature(MIXERS[mixer].__init__).parameters)[2:]:
        settings[p] = getattr(args, p, getattr(args, f"multiplex_{p}", None))
    for key, name in DECODING_FIELDS.items():
        settings[key] = getattr(args, name)
    settings.update(args.rollout_filters())  # what the rollout sampled with (generation_kwargs included)
    if not settings["top_k"] or settings["top_k"] < 0:  # TRL's 0 and vLLM's -1 mean no top-k filter
        settings["top_k"] = None
    return {"method": "multiplex_thinking", "paper": PAPER_URL, **settings}


def save_multiplex_settings(directory: str | os.PathLike, args: MultiplexGRPOConfig) -> str:
    """Write multiplex_config.json into `directory`; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SETTINGS_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(multiplex_settings(args), f, indent=2)
        f.write("\n")
    return path


def load_multiplex_settings(path: str | os.PathLike) -> dict | None:
    """Read multiplex_config.json from a model folder, the file itself, or a Hub model id; None when it has none."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / SETTINGS_FILE
    elif not path.is_file():
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

        try:
            path = Path(hf_hub_download(repo_id=str(path), filename=SETTINGS_FILE))
        except (EntryNotFoundError, LocalEntryNotFoundError, HFValidationError):
            return None
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --- model card -------------------------------------------------------------------------------------------------


def card_section(settings: dict) -> str:
    """The model-card section (between markers) that names the method, links the paper and lists the settings."""
    width, mixer = settings["width"], settings["mixer"]
    if width == 1:
        summary = (
            "This is the discrete-RL baseline of the paper: the same GRPO run with multiplex width K = 1, so every "
            "thinking position is one sampled token."
        )
    else:
        how = f"{settings['merge']}-merged" if mixer == "multiplex" else f"mixed (mixer '{mixer}')"
        summary = (
            f"At every thinking position the policy drew K = {width} tokens and fed their {how} embedding back as "
            "one *multiplex token*; the answer after the end-of-thinking marker is ordinary text. To reason the way "
            "it was trained, decode with the same settings."
        )
    shown = [key for key in settings if key not in ("method", "paper")]
    rows = "\n".join(f"| `{key}` | `{json.dumps(settings[key])}` |" for key in shown)
    return (
        f"{CARD_START}\n"
        "## Multiplex Thinking\n\n"
        f"This model was trained with **Multiplex Thinking** ([{PAPER_TITLE}]({PAPER_URL}), Tang et al. 2026, "
        f"arXiv:{PAPER_ID}) using `multiplex-trl` (GRPO with multiplex rollouts). {summary}\n\n"
        "| setting | value |\n|---|---|\n"
        f"{rows}\n\n"
        f"The same settings are stored in [`{SETTINGS_FILE}`]({SETTINGS_FILE}) next to `config.json`: "
        "`multiplex_trl.generate(model_folder, prompt)` (or `multiplex-trl generate`) decodes with them, "
        "`multiplex_trl.hub.load_multiplex_settings(path_or_repo_id)` reads them. transformers' own `generate()` "
        "decodes discretely (K = 1).\n"
        f"{CARD_END}\n"
    )


def write_model_card(directory: str | os.PathLike, args: MultiplexGRPOConfig, model_name: str | None = None) -> str:
    """Add (or refresh) the Multiplex Thinking section of `directory`/README.md, creating a card if none exists."""
    path = os.path.join(directory, "README.md")
    section = card_section(multiplex_settings(args))
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    else:
        name = model_name or Path(directory).resolve().name
        text = (
            "---\nlibrary_name: transformers\ntags:\n- trl\n- grpo\n- multiplex-thinking\n---\n\n"
            f"# Model Card for {name}\n\n"
        )
    # TRL's template links the base model even when it was a local folder; name it plainly instead.
    text = text.replace("[None](https://huggingface.co/None)", "a local model")
    text = re.sub(re.escape(CARD_START) + r".*?" + re.escape(CARD_END) + r"\n?", "", text, flags=re.S)
    # Right after the card's introduction (before its first "## " heading), so nobody misses how to decode.
    match = re.search(r"^## ", text, flags=re.M)
    text = (
        text[: match.start()] + section + "\n" + text[match.start() :] if match else text.rstrip() + "\n\n" + section
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def describe_model(directory: str | os.PathLike, args: MultiplexGRPOConfig, model_name: str | None = None) -> None:
    """Write multiplex_config.json and the card section into `directory` (a model folder or checkpoint)."""
    save_multiplex_settings(directory, args)
    write_model_card(directory, args, model_name)


# --- offline ------------------------------------------------------------------------------------------------------


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, also when set after huggingface_hub was imported."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.upper() in _TRUE


def check_push_possible(args: MultiplexGRPOConfig, push_revisions: bool = False) -> None:
    """Raise before any training when a push is asked for but the Hub cannot be reached by configuration."""
    if (args.push_to_hub or push_revisions) and hub_offline():
        flag = "push_to_hub" if args.push_to_hub else "push_revisions"
        raise ValueError(
            f"{flag}=True but HF_HUB_OFFLINE is set, so nothing can be pushed: unset HF_HUB_OFFLINE (and "
            f"TRANSFORMERS_OFFLINE) to push, or pass --{flag} false to train and save to {args.output_dir} only."
        )


# --- pushing ------------------------------------------------------------------------------------------------------


def _api():
    # transformers' shared HfApi (the Trainer pushes through it too), tagged with the library's user agent.
    from transformers.utils.hub import hf_api

    return hf_api()


@contextmanager
def zero3_init_disabled():
    """Let one process build an ordinary (unsharded) model while a ZeRO-3 run is configured."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref  # what `is_deepspeed_zero3_enabled()` reads
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def save_merged(trainer, directory: str | os.PathLike) -> str:
    """Save the LoRA adapter merged into its base model (plus tokenizer) to `directory`; main process only."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    args = trainer.args
    adapter = PeftConfig.from_pretrained(args.output_dir)
    # The base at the revision it was trained from: TRL's adapter_config.json records none (--model_revision).
    revision = adapter.revision or (getattr(args, "model_init_kwargs", None) or {}).get("revision")
    # Reload from the saved adapter rather than merging the live model: under ZeRO-3 the live weights are sharded.
    # This process alone loads a full copy, so ZeRO-3's collective init must be off (it would wait for the others).
    with zero3_init_disabled():
        base = AutoModelForCausalLM.from_pretrained(
            adapter.base_model_name_or_path, revision=revision, dtype="auto", trust_remote_code=args.trust_remote_code
        )
        PeftModel.from_pretrained(base, args.output_dir).merge_and_unload().save_pretrained(directory)
    trainer.processing_class.save_pretrained(directory)
    return str(directory)


def finish_training(trainer, *, push_merged: bool = False, dataset_name: str | None = None) -> str:
    """Save the trained model to output_dir with its settings and card, then push when `push_to_hub` is set.

    The local save always happens first, so a failing push never loses the model. Returns the folder that was pushed
    (or would be): output_dir, or output_dir/merged for a LoRA run with `push_merged`.
    """
    args = trainer.args
    output_dir = args.output_dir
    # `_internal_call=True`: save without the Trainer's own push; ours below carries the card and the right files.
    trainer.save_model(output_dir, _internal_call=True)
    model_name = (args.hub_model_id or Path(output_dir).resolve().name).split("/")[-1]
    # TRL's card (main process); its metadata takes Hub dataset ids only, not local paths or offline sources.
    is_hub_id = dataset_name and re.fullmatch(r"[\w.-]+/[\w.-]+", dataset_name) and not os.path.exists(dataset_name)
    # MultiplexGRPOTrainer.create_model_card also writes our card section and multiplex_config.json.
    trainer.create_model_card(model_name=model_name, dataset_name=dataset_name if is_hub_id else None)
    folder = os.path.join(output_dir, MERGED_DIR) if push_merged else output_dir
    if trainer.accelerator.is_main_process:
        if push_merged:
            save_merged(trainer, folder)
            card = Path(output_dir, "README.md").read_text(encoding="utf-8")
            Path(folder, "README.md").write_text(card.replace("library_name: peft", "library_name: transformers"))
            save_multiplex_settings(folder, args)
    trainer.accelerator.wait_for_everyone()
    if args.push_to_hub and trainer.is_world_process_zero():
        trainer._finish_current_push()  # let a running checkpoint push finish before the final commit
        _api().upload_folder(
            repo_id=trainer.hub_model_id,
            folder_path=folder,
            commit_message="End of training",
            token=args.hub_token,
            revision=args.hub_revision,
            ignore_patterns=["_*", "checkpoint-*", f"{MERGED_DIR}/*", "training_args.bin"],
            # Merged weights replace an adapter pushed by earlier checkpoint saves (a repo with both loads as PEFT).
            delete_patterns=ADAPTER_FILES if push_merged else None,
        )
    return folder


class MultiplexSettingsCallback(TrainerCallback):
    """Keeps multiplex_config.json and the card section in output_dir and in every checkpoint (before any push)."""

    def __init__(self, args: MultiplexGRPOConfig):
        self.multiplex_args = args

    def _describe(self, args, state) -> None:
        """Settings and card into output_dir, the card into the checkpoint of this step (TRL rewrites output_dir's card
        first; the checkpoint's settings are written by MultiplexGRPOTrainer.save_model)."""
        describe_model(args.output_dir, self.multiplex_args)
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(checkpoint):
            shutil.copy(os.path.join(args.output_dir, "README.md"), os.path.join(checkpoint, "README.md"))

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            save_multiplex_settings(args.output_dir, self.multiplex_args)

    def on_push_begin(self, args, state, control, **kwargs):
        # A checkpoint push (hub_strategy) uploads output_dir, and the checkpoint itself, right after this.
        if state.is_world_process_zero:
            self._describe(args, state)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._describe(args, state)


class PushRevisionCallback(TrainerCallback):
    """Push every saved checkpoint (model, tokenizer, settings, card; no optimizer state) to the branch `step-<N>`.

    The repo is `hub_model_id` (or the output_dir name), created if missing. Pushes run synchronously on the main
    process, so a checkpoint cannot be rotated away while it uploads.
    """

    def __init__(self, args: MultiplexGRPOConfig, repo_id: str | None = None):
        self.multiplex_args = args
        self.repo_id = repo_id
        self.pushed: list[str] = []  # branches pushed so far

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        api = _api()
        if self.repo_id is None or "/" not in self.repo_id:
            name = self.repo_id or args.hub_model_id or Path(args.output_dir).resolve().name
            self.repo_id = api.create_repo(
                name, token=args.hub_token, private=args.hub_private_repo, exist_ok=True
            ).repo_id
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        describe_model(checkpoint, self.multiplex_args, self.repo_id.split("/")[-1])
        branch = f"step-{state.global_step}"
        api.create_branch(self.repo_id, branch=branch, token=args.hub_token, exist_ok=True)
        api.upload_folder(
            repo_id=self.repo_id,
            folder_path=checkpoint,
            commit_message=f"Checkpoint at step {state.global_step}",
            token=args.hub_token,
            revision=branch,
            ignore_patterns=CHECKPOINT_IGNORE,
        )
        self.pushed.append(branch)
