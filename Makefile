# Two commands for a fresh machine, each creating .venv on first use:
#   make run    start both predictors and the OpenAI adapter on loopback (tiny models)
#   make test   run the linters and the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
# torch is installed on its own, first: 2.13.0 is the build CI tests with (CPU on this
# project's CI machines). Set TORCH=torch to take your platform's default build instead.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install run test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[predictor,dev]"
	touch $@

run: install
	$(BIN)/qwen-image-stack

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest
