# `make test` and `make venv` work on a fresh machine with python3.11.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lint typecheck format docs clean

venv: $(STAMP)

# torch first, so that pip takes the CPU wheel that lies on the machine instead of a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,tracking,bench]'
	# SGLang's own request/response schema for contract tests; its runtime needs a GPU, so no deps.
	$(BIN)/pip install -q --no-deps sglang==0.5.23
	touch $(STAMP)

# The main job on the embedded default: tiny-math GRPO on CPU, written to runs/demo.
demo: venv
	$(BIN)/python examples/tiny-math/make_assets.py --out examples/tiny-math/assets
	$(BIN)/slime-wf train --config examples/tiny-math/campaign.yaml

# Everything CI runs: the lint of `make lint`, then every tier (tests/unit, tests/integration, tests/e2e).
test: lint
	$(BIN)/pytest -q

# The edit loop: every test not marked slow (about 100 s on 2 cores).
test-fast: venv
	$(BIN)/pytest -q -m "not slow"

# ruff (lint and format), the import contracts in pyproject.toml (layers, no cycles, what the engine
# server may import), and mypy over slime_wf.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

# mypy over slime_wf, with the settings in pyproject.toml's [tool.mypy]
typecheck: venv
	$(BIN)/mypy

# Apply the formatter and ruff's safe fixes.
format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Regenerate the configuration reference and the metrics table embedded in README.md.
docs: venv
	$(BIN)/python -m slime_wf.config --write-readme README.md
	$(BIN)/python -m slime_wf.metrics --write-readme README.md

clean:
	rm -rf $(VENV) .pytest_cache
