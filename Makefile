# Two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
QUIET_PIP := { grep -v "is ignored" || true; }
# The CPU wheel of torch 2.13.0 is what CPU machines get; on a GPU node pip
# resolves the same pin to the CUDA build. Override with TORCH_SPEC=... or
# install your own torch into .venv first: setup keeps an importable torch.
TORCH_SPEC ?= torch==2.13.0
export PREFECT_HOME ?= $(CURDIR)/.prefect
# Scripts outside the CLI run under mace-ood's environment defaults (mace_ood/runtime.py's one
# table; the CLI and the tests apply it themselves), read when a recipe runs, after setup.
SCRIPT = env $$($(PY) -m mace_ood.runtime) $(PY)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test lint docs bench gpu-check clean

setup: $(VENV)/.installed

# torch through pip (it honours the machine's pip config: where a CPU wheel lies); the rest through
# uv where it can be had (the same versions; setup 50 s against pip's 68 s here), else pip. Bytecode
# is compiled at install, as pip does: where PYTHONDONTWRITEBYTECODE is set (this box) nothing is
# cached at import, and every process compiled prefect, distributed and mace again (11 s, not 6 s).

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" 2>&1 | $(QUIET_PIP)
	$(PY) -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
	{ $(PY) -m pip install -q uv 2>&1 | $(QUIET_PIP) && $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e ".[dev]"; } \
		|| $(PY) -m pip install -q -e ".[dev]" 2>&1 | $(QUIET_PIP)
	$(PY) -c "import mace_ood, mace_ood.flows, mace_ood.tasks, prefect, prefect_dask"
	touch $@

demo: setup
	$(VENV)/bin/mace-ood demo

# Two xdist workers, one test file at a time each (a module's fixtures are built once), the
# longest files first (tests/conftest.py; xdist keeps that order only with --no-loadscope-reorder).
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=12

# Every benchmark (about 40 min on 2 cores); each prints a markdown table.
bench: setup
	$(SCRIPT) benchmarks/extraction.py
	$(SCRIPT) benchmarks/batching.py
	$(SCRIPT) benchmarks/loader.py
	$(SCRIPT) benchmarks/scoring.py
	$(SCRIPT) benchmarks/selection.py
	$(SCRIPT) benchmarks/all_scores.py --atoms 100000
	$(SCRIPT) benchmarks/select_at_scale.py
	$(SCRIPT) benchmarks/full_run.py memory
	$(SCRIPT) benchmarks/full_run.py workers --seeds 4
	$(SCRIPT) benchmarks/worker_start.py --workers 2 --rounds 3

# One prepared command for a lent GPU machine (about 5 min on one GPU); Prefect-free.
gpu-check: setup
	$(SCRIPT) benchmarks/gpu_check.py

# The documentation site into site/: MkDocs Material, the config and CLI pages generated from the
# code (docs/hooks.py), the API from the docstrings (mkdocstrings); --strict: a warning fails it.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

$(VENV)/.docs-installed: $(VENV)/.installed
	$(VENV)/bin/uv pip install -q --python $(PY) -e ".[dev,docs]" || $(PY) -m pip install -q -e ".[dev,docs]"
	touch $@

lint: setup
	$(VENV)/bin/ruff check mace_ood tests benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .prefect demo_work site
