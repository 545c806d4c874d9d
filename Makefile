# Two commands for a fresh machine, each creating .venv on first use:
#   make run    start both predictors and the OpenAI adapter on loopback (tiny models)
#   make test   run the linters and the whole test suite (what CI runs)
# and, after changing a dependency in pyproject.toml:
#   make lock   pin the container images' dependencies (requirements/*.txt)
PYTHON ?= python3
VENV ?= .venv
# torch is installed on its own, first: 2.13.0 is the build CI tests with (CPU on this
# project's CI machines). Set TORCH=torch to take your platform's default build instead.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

# The images' Python (the Dockerfile's PYTHON_IMAGE) and platform, which the locks are for.
IMAGE_PYTHON ?= 3.12
IMAGE_PLATFORM ?= x86_64-manylinux_2_28
LOCK := $(BIN)/uv pip compile pyproject.toml --quiet --custom-compile-command "make lock" \
	--python-version $(IMAGE_PYTHON) --python-platform $(IMAGE_PLATFORM)

.PHONY: install run test lint lock

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[predictor,dev]"
	touch $@

# ARGS: the stack's flags, e.g. make run ARGS="--startup-timeout 3600" for a first download.
run: install
	$(BIN)/qwen-image-stack $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

# Every dependency of each image, pinned: the adapter's (no extras) and the predictor's
# (predictor and fp8 extras, torch at the version CI tests). The Dockerfile installs with
# these as constraints; predictor-torch.txt is the part of predictor.txt that torch needs,
# for the image's torch layer alone (a change to another pin leaves that layer cached).
lock: install
	$(LOCK) --output-file requirements/adapter.txt
	echo "$(TORCH)" | $(LOCK) - --extra predictor --extra fp8 --output-file requirements/predictor.txt
	echo "$(TORCH)" | $(LOCK) - -c requirements/predictor.txt --output-file requirements/predictor-torch.txt
