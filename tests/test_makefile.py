"""The Makefile's install and test targets, with stand-in interpreters (no pip runs, nothing is downloaded)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make(*args, **env):
    return subprocess.run(
        ["make", "-s", "--no-print-directory", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def stamp(venv: Path) -> Path:
    out = make("--eval", "print-stamp: ; @echo $(STAMP)", "print-stamp", f"VENV={venv}")
    return Path(out.stdout.strip())


def fake_venv(venv: Path, script: str) -> None:
    """A venv whose bin/python is a shell script: what the Makefile runs is all it sees of the interpreter."""
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\n" + script)
    python.chmod(0o755)


@pytest.mark.parametrize("installed", [False, True], ids=["no-stamp", "stamp"])
def test_a_venv_whose_python_is_gone_is_refused_in_one_line(tmp_path, installed):
    """A .venv whose interpreter was removed (a dangling link) failed as `.venv/bin/python: No such file` once it was
    stamped, and before that in `python -m venv`, which keeps a dangling link; neither named the fix."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(tmp_path / "removed" / "python3.11")
    if installed:
        stamp(venv).touch()
    for target in ("install", "test"):
        result = make(target, f"VENV={venv}")
        assert result.returncode != 0
        (line,) = [line for line in result.stdout.splitlines() if line.startswith("make install:")]
        assert "does not run Python >= 3.11" in line and f"rm -rf {venv}" in line


def test_a_venv_of_an_older_python_is_refused_before_pip(tmp_path):
    """A .venv made by Python 3.10 went on to pip (and a torch download) and failed on requires-python."""
    venv = tmp_path / "venv"
    fake_venv(venv, 'case "$*" in *version_info*) exit 1;; esac\necho "pip ran: $*"\n')
    result = make("install", f"VENV={venv}")
    assert result.returncode != 0 and "pip ran" not in result.stdout
    assert "does not run Python >= 3.11 (its interpreter is missing or too old): remove it" in result.stdout


def test_an_older_python_makes_no_venv(tmp_path):
    old = tmp_path / "python3.10"
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    result = make("install", f"VENV={tmp_path / 'venv'}", f"PYTHON={old}")
    assert result.returncode != 0 and not (tmp_path / "venv").exists()
    assert f"PYTHON={old} is not Python >= 3.11" in result.stdout


@pytest.mark.parametrize("rc", [0, 1, 5])
def test_make_test_exits_with_pytests_status(tmp_path, rc):
    """Any pytest failure, and 5 (no tests collected), fails `make test` (and so .ci/run); an installed venv is not
    reinstalled."""
    venv = tmp_path / "venv"
    fake_venv(venv, 'case "$*" in *"-m pip"*) echo "pip ran";; esac\ncase "$*" in *"-m pytest"*) exit $RC;; esac\n')
    stamp(venv).touch()
    result = make("test", f"VENV={venv}", RC=str(rc))
    assert "pip ran" not in result.stdout
    assert (result.returncode == 0) == (rc == 0)
    assert ("collected no tests" in result.stdout) == (rc == 5)
