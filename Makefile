# The two commands: `make demo` and `make test`. Both create .venv if missing and install the project.
#
# TORCH_SPEC pins the PyTorch build installed first. The default is the CPU build our CI uses (an unpinned
# torch pulls a multi-GB CUDA build); on a GPU machine use e.g. `make demo TORCH_SPEC='torch>=2.6'`.

PYTHON_SYSTEM ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# `make test` runs the suite in pytest-xdist workers: much of its time is spent waiting (timeouts, signals,
# schedulers, scrapes), and the other worker's tests use it. A file's tests run in one worker, in order, so
# that its module fixtures (a trained run, a curated table) are built once. 0 runs in this process.
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --quiet --disable-pip-version-check

.PHONY: demo test lint format bench clean

$(PY):
	@$(PYTHON_SYSTEM) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "svd needs Python >= 3.11 (PYTHON_SYSTEM=$(PYTHON_SYSTEM))"; exit 1; }
	$(PYTHON_SYSTEM) -m venv $(VENV)

$(VENV)/.installed-runtime: pyproject.toml | $(PY)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e '.[local]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps 'scenedetect>=0.6'  # benchmark baseline; its opencv-python would clash
	touch $@ $(VENV)/.installed-runtime

demo: $(VENV)/.installed-runtime
	$(PY) jobs/demo.py $(ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

bench: $(VENV)/.installed-dev
	$(PY) bench/unet.py
	$(PY) bench/loader.py
	$(PY) bench/curate.py
	$(PY) bench/train.py
	$(PY) bench/row_index.py
	$(PY) bench/eval.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
