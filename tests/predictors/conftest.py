"""Real predictor servers (tiny pipelines) shared by the predictor tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.servers import RunningPredictor, run_predictor

# A small least size so tests run tiny images fast. The most stays the default (2048): it
# must allow the generation default, 1664x928, and edit outputs follow the input's aspect
# ratio at ~1024x1024 area.
TEST_LIMITS = ("--min_size=64",)
EDIT_MAX_INPUT_PIXELS = 1_000_000


@pytest.fixture(scope="session")
def tiny_cache_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment pointing predictors at a tiny-pipeline cache private to this session."""
    return {"QWEN_TINY_CACHE_DIR": str(tmp_path_factory.mktemp("tiny-cache"))}


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random PEFT-format LoRA (rank 4) on the tiny transformer's attention projections."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for block in range(2):
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            prefix = f"transformer.transformer_blocks.{block}.attn.{projection}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(4, 32, generator=generator)
            state[f"{prefix}.lora_B.weight"] = torch.randn(32, 4, generator=generator)
    path = tmp_path_factory.mktemp("lora") / "lightning.safetensors"
    save_file(state, path)
    return path


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("predictor-logs")


@pytest.fixture(scope="session")
def generation_predictor(tiny_cache_env, log_dir) -> Iterator[RunningPredictor]:
    with run_predictor(
        "predictors.generation", "qwen-image", log_dir, *TEST_LIMITS, env=tiny_cache_env
    ) as predictor:
        yield predictor


@pytest.fixture(scope="session")
def edit_predictor(tiny_cache_env, log_dir) -> Iterator[RunningPredictor]:
    with run_predictor(
        "predictors.edit",
        "qwen-image-edit",
        log_dir,
        "--min_size=64",
        f"--max_input_pixels={EDIT_MAX_INPUT_PIXELS}",
        env=tiny_cache_env,
    ) as predictor:
        yield predictor
