# Two commands do all the set-up on a fresh machine:
#   make repro   create .venv, install the project, run the whole DVC pipeline
#   make test    create .venv, install the project with dev tools, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Stage commands in dvc.yaml call `python`/`torchrun`: run them with the venv first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro test lint bench table1 clean-venv

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

install: $(BIN)/.installed

repro: install
	$(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest

# the paper's Table 1 over table1.seeds seeds of DVC experiments -> reports/table1.{md,json,png}
table1: install
	$(BIN)/python -m products10k.report.table1 run

bench: install
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)
