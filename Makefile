# Two commands do all the set-up on a fresh machine:
#   make repro   create .venv, install the project, run the whole DVC pipeline
#   make test    create .venv, install the project with dev tools, run the test suite
PYTHON ?= python3
VENV ?= .venv
# The exact packages, pinned by hash (tools/lock.py). `make install LOCK=` installs from pyproject.toml's
# floors instead: the newest releases the registry serves, for a platform the lock was not made on.
LOCK ?= requirements.lock
BIN := $(VENV)/bin
# Stage commands in dvc.yaml call `python`/`torchrun`: run them with the venv first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro test lint bench table1 lock clean-venv chromium wheelhouse gpu-check

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
ifeq ($(strip $(LOCK)),)
	$(BIN)/python -m pip install -e '.[dev]'
else
	$(BIN)/python -m pip install --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --no-deps -e .
	$(BIN)/python -m pip check
endif
	touch $@

install: $(BIN)/.installed

# re-resolve pyproject.toml's floors against the registry and rewrite requirements.lock (then commit it)
lock:
	$(PYTHON) tools/lock.py

repro: install
	$(BIN)/dvc repro

# without the lock, tests/test_lock.py's check that the environment is the locked one is skipped, said so
test: install chromium
	$(if $(strip $(LOCK)),,PRODUCTS10K_UNLOCKED=1) $(BIN)/python -m pytest

# the serve page's browser test drives Debian's Chromium through its chromedriver (never a download)
chromium:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		echo "installing Debian's chromium and chromium-driver for the browser test"; \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

# the paper's Table 1 over table1.seeds seeds of DVC experiments -> reports/table1.{md,json,png}
table1: install
	$(BIN)/python -m products10k.report.table1 run

# wheels the pipeline needs beyond a GPU box's image (benchmarks/gpu_box_packages.txt), for its Python,
# into wheelhouse/ (git-ignored); timm is pinned to the lock's so that timm's train.py runs the same models
WHEELHOUSE_ARGS ?= --python-version 3.12 --pin timm
wheelhouse: install
	$(BIN)/python tools/wheelhouse.py $(WHEELHOUSE_ARGS)

# on the GPU box (no registry, no venv: its own python3): install wheelhouse/, run benchmarks/gpu_check.py
# TIMM_TRAIN=path/to/timm/train.py adds the comparison with timm's own training script
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --wheelhouse wheelhouse $(if $(TIMM_TRAIN),--timm-train $(TIMM_TRAIN)) $(GPU_CHECK_ARGS)

bench: install
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)
