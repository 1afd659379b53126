"""Pushing to the Hub end to end, against a recorded fake of the upload API (HfApi.create_repo / create_branch /
upload_folder, what transformers' Trainer and our pushes call): the repo id, the files that arrive, the card."""

import concurrent.futures
import fnmatch
import json
import os

import pytest
import torch
from grpo_run import tiny_run_args
from huggingface_hub import HfApi, RepoUrl, constants
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from multiplex_trl import grpo, hub


pytestmark = pytest.mark.usefixtures("text_hash_reward")  # the `text_hash` reward of tests/grpo_run.py


USER = "tester"
TOKEN = "hf_FAKEtokenTHATmustNEVERbeWRITTEN"
WEIGHTS = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
ADAPTER = {"adapter_config.json", "adapter_model.safetensors"}


class FakeHub:
    """The Hub's upload API in memory: repos[repo_id][branch] = {path: bytes}; `calls` records every request."""

    def __init__(self):
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.calls: list[tuple[str, str, dict]] = []

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        repo_id = repo_id if "/" in repo_id else f"{USER}/{repo_id}"  # the token's namespace, as on the Hub
        self.calls.append(("create_repo", repo_id, {"private": private, "token": token}))
        if repo_id in self.repos and not exist_ok:
            raise FileExistsError(repo_id)
        self.repos.setdefault(repo_id, {"main": {}})
        return RepoUrl(f"https://huggingface.co/{repo_id}", endpoint="https://huggingface.co")

    def create_branch(self, repo_id, *, branch, revision=None, token=None, exist_ok=False, **kwargs):
        self.calls.append(("create_branch", repo_id, {"branch": branch, "token": token}))
        branches = self.repos[repo_id]
        if branch in branches and not exist_ok:
            raise FileExistsError(branch)
        branches.setdefault(branch, dict(branches[revision or "main"]))  # a new branch starts from main's files

    def upload_folder(
        self,
        *,
        repo_id,
        folder_path,
        path_in_repo=None,
        commit_message=None,
        token=None,
        revision=None,
        allow_patterns=None,
        ignore_patterns=None,
        delete_patterns=None,
        run_as_future=False,
        **kwargs,
    ):
        files = self.repos[repo_id][revision or "main"]  # KeyError for an unknown repo or branch, as on the Hub
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        for path in [p for p in files if p.startswith(prefix) and delete_patterns]:
            if any(fnmatch.fnmatch(path[len(prefix) :], pattern) for pattern in delete_patterns):
                del files[path]
        local = [os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs]
        for rel in filter_repo_objects(local, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            with open(os.path.join(folder_path, rel), "rb") as f:
                files[prefix + rel] = f.read()
        self.calls.append(
            ("upload_folder", repo_id, {"revision": revision or "main", "message": commit_message, "token": token})
        )
        if run_as_future:  # the Trainer's checkpoint pushes run in the background; this one is already done
            future = concurrent.futures.Future()
            future.set_result(None)
            return future

    def create_commit(self, *args, **kwargs):
        raise AssertionError("create_commit was not expected: pushes go through upload_folder")


@pytest.fixture
def fake_hub(monkeypatch):
    fake = FakeHub()
    for name in ("create_repo", "create_branch", "upload_folder", "create_commit"):
        method = getattr(fake, name)
        monkeypatch.setattr(HfApi, name, lambda self, *args, _method=method, **kwargs: _method(*args, **kwargs))
    # Online as far as the code can tell; the fake answers every request that would leave the machine.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return fake


def assert_card(card: bytes):
    text = card.decode()
    assert "## Multiplex Thinking" in text and "https://arxiv.org/abs/2601.08808" in text
    assert "| `width` | `3` |" in text and '| `merge` | `"weighted"` |' in text
    assert '| `thinking_end` | `"</think>"` |' in text and "| `temperature` | `1.0` |" in text


def assert_no_secret(fake: FakeHub, *folders):
    for branches in fake.repos.values():
        for files in branches.values():
            for path, data in files.items():
                assert TOKEN.encode() not in data, f"the hub token was pushed in {path}"
    for folder in folders:
        for d, _, fs in os.walk(folder):
            for f in fs:
                with open(os.path.join(d, f), "rb") as fh:
                    assert TOKEN.encode() not in fh.read(), f"the hub token was written to {d}/{f}"


def test_push_model_checkpoints_and_revisions(fake_hub, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    repo = "tester/tiny-multiplex"
    flags = ["--push_to_hub", "true", "--hub_model_id", repo, "--hub_token", TOKEN, "--hub_private_repo", "true"]
    grpo.main(tiny_run_args(tiny_model_dir, data, out, *flags, "--push_revisions", "true"))

    assert set(fake_hub.repos) == {repo}
    assert {c[2]["private"] for c in fake_hub.calls if c[0] == "create_repo"} == {True}
    branches = fake_hub.repos[repo]
    assert set(branches) == {"main", "step-1", "step-2"}

    main = branches["main"]
    assert WEIGHTS | {"multiplex_config.json", "README.md"} <= set(main)
    assert not any(p.startswith("checkpoint-") for p in main)
    assert main["model.safetensors"] == (out / "model.safetensors").read_bytes()  # the final weights
    assert json.loads(main["multiplex_config.json"]) == hub.load_multiplex_settings(out)
    assert_card(main["README.md"])
    assert b"huggingface.co/None" not in main["README.md"]  # the base model was a local folder, not a Hub repo
    last = [c for c in fake_hub.calls if c[0] == "upload_folder"][-1]
    assert (last[2]["revision"], last[2]["message"]) == ("main", "End of training")
    assert all(c[2]["token"] == TOKEN for c in fake_hub.calls), "a request went out without the hub token"

    for step in (1, 2):
        files = branches[f"step-{step}"]
        checkpoint = out / f"checkpoint-{step}"
        assert WEIGHTS | {"multiplex_config.json", "README.md", "trainer_state.json"} <= set(files)
        assert files["model.safetensors"] == (checkpoint / "model.safetensors").read_bytes()
        assert not {"optimizer.pt", "scheduler.pt", "rng_state.pth"} & set(files)
        assert_card(files["README.md"])
    assert branches["step-1"]["model.safetensors"] != branches["step-2"]["model.safetensors"]
    assert_no_secret(fake_hub, out)


def test_checkpoint_pushes_carry_settings_and_card(fake_hub, tiny_model_dir, data, tmp_path):
    flags = ["--push_to_hub", "true", "--hub_model_id", "ckpt", "--hub_strategy", "all_checkpoints"]
    grpo.main(tiny_run_args(tiny_model_dir, data, tmp_path / "run", *flags))
    main = fake_hub.repos[f"{USER}/ckpt"]["main"]
    for step in (1, 2):  # the Trainer uploads each checkpoint folder under its own name
        assert {f"checkpoint-{step}/multiplex_config.json", f"checkpoint-{step}/model.safetensors"} <= set(main)
        assert_card(main[f"checkpoint-{step}/README.md"])
    assert_card(main["README.md"])


def test_lora_pushes_the_adapter(fake_hub, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    lora = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]
    grpo.main(tiny_run_args(tiny_model_dir, data, out, *lora, "--push_to_hub", "true", "--hub_model_id", "lora"))

    main = fake_hub.repos[f"{USER}/lora"]["main"]
    assert ADAPTER | {"multiplex_config.json", "README.md"} <= set(main)
    assert "model.safetensors" not in main
    assert_card(main["README.md"])
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in adapter.items()), "adapter never trained"


def test_lora_push_merged(fake_hub, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    lora = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]
    flags = ["--push_to_hub", "true", "--hub_model_id", "merged", "--push_merged", "true"]
    grpo.main(tiny_run_args(tiny_model_dir, data, out, *lora, *flags))

    main = fake_hub.repos[f"{USER}/merged"]["main"]
    assert WEIGHTS | {"multiplex_config.json", "README.md"} <= set(main)
    assert not ADAPTER & set(main), "merged weights must replace the adapter pushed with the checkpoints"
    assert main["model.safetensors"] == (out / "merged" / "model.safetensors").read_bytes()
    assert_card(main["README.md"])
    assert (out / "adapter_model.safetensors").is_file()  # the adapter stays in output_dir
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base.state_dict()[q])
    assert torch.equal(merged.state_dict()["lm_head.weight"], base.state_dict()["lm_head.weight"])


def test_offline_push_is_refused_before_training(monkeypatch, tiny_model_dir, data, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported (e.g. a recipe's `env:`)
    monkeypatch.setattr(grpo, "MultiplexGRPOTrainer", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(grpo.ConfigError, match="push_to_hub=True but HF_HUB_OFFLINE is set") as error:
        grpo.main(tiny_run_args(tiny_model_dir, data, tmp_path / "run", "--push_to_hub", "true"))
    assert "--push_to_hub false" in str(error.value) and "\n" not in str(error.value)


def test_saved_settings_are_the_filters_the_rollout_sampled_with():
    """generation_kwargs override the rollout's filters, so multiplex_config.json (what `generate` and `eval` decode a
    trained model with) records them; it recorded the fields instead. vLLM's top_k -1 is no filter, like TRL's 0."""
    from multiplex_trl import MultiplexGRPOConfig

    args = MultiplexGRPOConfig(
        output_dir="/tmp/unused",
        use_cpu=True,
        bf16=False,
        generation_kwargs={"top_p": 0.9, "top_k": 20, "min_p": 0.05},
    )
    settings = hub.multiplex_settings(args)
    assert (settings["top_p"], settings["top_k"], settings["min_p"]) == (0.9, 20, 0.05)
    assert (
        hub.multiplex_settings(MultiplexGRPOConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, top_k=-1))[
            "top_k"
        ]
        is None
    )


def test_merged_lora_is_built_on_the_trained_revision(tmp_path, tok, monkeypatch):
    """TRL's adapter_config.json records no revision, so the merge loaded the base at `main`, not --model_revision."""
    import types

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from multiplex_trl.testing import tiny_model

    tiny_model(tok).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "run")
    loads = []
    load = AutoModelForCausalLM.from_pretrained

    def recording(path, *args, **kwargs):
        loads.append(kwargs.get("revision"))
        return load(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    args = types.SimpleNamespace(
        output_dir=str(tmp_path / "run"), trust_remote_code=False, model_init_kwargs={"revision": "v1.0"}
    )
    hub.save_merged(types.SimpleNamespace(args=args, processing_class=tok), tmp_path / "merged")
    assert loads == ["v1.0"]
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def _config(**kwargs):
    from multiplex_trl import MultiplexGRPOConfig

    return MultiplexGRPOConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, **kwargs)


def test_card_of_the_discrete_baseline_and_of_another_mixer(tmp_path):
    discrete = hub.card_section(hub.multiplex_settings(_config(multiplex_width=1)))
    assert "discrete-RL baseline" in discrete and "| `width` | `1` |" in discrete
    assert "drew K" not in discrete
    dirichlet = hub.card_section(hub.multiplex_settings(_config(mixer="dirichlet", dirichlet_gamma=2.0)))
    assert "drew K = 3 tokens" in dirichlet and "mixed (mixer 'dirichlet')" in dirichlet
    assert '| `mixer` | `"dirichlet"` |' in dirichlet and "| `dirichlet_gamma` | `2.0` |" in dirichlet


def test_saved_settings_carry_the_mixers_own_parameters():
    """A mixer's parameters are config fields named like them (dirichlet_gamma) or with multiplex_ (merge): both are
    saved, so `generate` decodes a trained model with them."""
    assert hub.multiplex_settings(_config(mixer="dirichlet", dirichlet_gamma=2.0))["dirichlet_gamma"] == 2.0
    assert hub.multiplex_settings(_config(multiplex_merge="averaged"))["merge"] == "averaged"


def test_card_section_goes_before_the_first_heading_and_is_replaced(tmp_path):
    (tmp_path / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# Model\n\nIntro.\n\n## Usage\n\nx\n")
    hub.write_model_card(tmp_path, _config(multiplex_width=2))
    hub.write_model_card(tmp_path, _config(multiplex_width=3))
    text = (tmp_path / "README.md").read_text()
    assert text.count(hub.CARD_START) == 1 and "| `width` | `3` |" in text and "| `width` | `2` |" not in text
    assert text.index("Intro.") < text.index("## Multiplex Thinking") < text.index("## Usage")


def test_transformers_offline_counts_as_offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not hub.hub_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert hub.hub_offline()


def test_trainer_checkpoints_carry_the_settings_without_the_script(tmp_path, tok):
    """MultiplexGRPOTrainer used directly (README: Minimal example): every checkpoint and a final `save_model` hold
    multiplex_config.json, so `generate(checkpoint)` decodes with the trained settings (it fell back to the paper's
    defaults: no thinking budget)."""
    from test_trainer import _args, _trainer

    from multiplex_trl.testing import tiny_model

    out = tmp_path / "run"
    tr = _trainer(tok, tiny_model(tok), _args(out, max_steps=2, save_strategy="steps", save_steps=1))
    tr.train()
    tr.save_model(str(tmp_path / "final"))
    for folder in (out / "checkpoint-1", out / "checkpoint-2", tmp_path / "final"):
        settings = hub.load_multiplex_settings(folder)
        assert settings == hub.multiplex_settings(tr.args), folder
        assert settings["max_thinking_tokens"] == 8
