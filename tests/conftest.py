"""Session fixtures for the adapter tests: the local stack and extra adapters (real processes)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from predictors.tiny import tiny_pipeline_dir
from tests.adapter_stack import (
    API_KEY,
    READY_LINE,
    STARTUP_TIMEOUT,
    Stack,
    alive,
    encode_image,
    run_adapter,
    start_stack,
    stop,
)
from tests.servers import RunningPredictor, free_port, run_predictor


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One local stack for the session; stopped with Ctrl-C (SIGINT) at the end, which must
    leave no child behind."""
    running = start_stack(tmp_path_factory.mktemp("stack") / "stack.log")
    if not running.wait_for(lambda log: READY_LINE in log, STARTUP_TIMEOUT):
        stop(running.process, signal.SIGTERM)
        pytest.fail(f"the local stack did not get ready:\n{running.log()[-5000:]}")
    assert f"{READY_LINE}{running.base_url}" in running.log()
    yield running
    status = stop(running.process)
    leftovers = [name for name, pid in running.child_pids().items() if alive(pid)]
    assert status == 0, running.log()[-3000:]
    assert not leftovers, f"children left running after Ctrl-C: {leftovers}"


@pytest.fixture(scope="session")
def client(stack: Stack) -> OpenAI:
    """The openai SDK against the stack, without retries so that errors surface at once."""
    return OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def down_adapter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An adapter with an API key whose predictors are down (closed ports): its base URL."""
    closed = f"http://127.0.0.1:{free_port()}"
    env = {
        "QWEN_ADAPTER_GENERATION_URL": closed,
        "QWEN_ADAPTER_EDIT_URL": closed,
        "QWEN_ADAPTER_API_KEY": API_KEY,
    }
    process, url = run_adapter(tmp_path_factory.mktemp("down") / "adapter.log", env)
    yield url
    stop(process, signal.SIGTERM)


@pytest.fixture(scope="session")
def impatient_adapter(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An adapter serving only the stack's generation predictor, with a 50 ms timeout."""
    env = {
        "QWEN_ADAPTER_GENERATION_URL": stack.generation_url,
        "QWEN_ADAPTER_EDIT_URL": "",
        "QWEN_ADAPTER_REQUEST_TIMEOUT_SECONDS": "0.05",
    }
    process, url = run_adapter(tmp_path_factory.mktemp("impatient") / "adapter.log", env)
    yield url
    stop(process, signal.SIGTERM)


@pytest.fixture(scope="session")
def edit_plus_predictor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPredictor]:
    """An edit predictor serving the tiny ``QwenImageEditPlusPipeline``, the pipeline of
    Qwen-Image-Edit-2509 and later, which edits from several images."""
    location = tiny_pipeline_dir("edit-plus", tmp_path_factory.mktemp("tiny-plus"))
    with run_predictor(
        "predictors.edit",
        "qwen-image-edit",
        tmp_path_factory.mktemp("plus-logs"),
        "--min_size=64",
        env={"QWEN_IMAGE_EDIT_LOCATION": str(location)},
    ) as predictor:
        yield predictor


@pytest.fixture(scope="session")
def edit_plus_client(
    edit_plus_predictor: RunningPredictor, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OpenAI]:
    """The openai SDK against an adapter serving ``edit_plus_predictor`` for edits."""
    env = {"QWEN_ADAPTER_GENERATION_URL": "", "QWEN_ADAPTER_EDIT_URL": edit_plus_predictor.url}
    process, url = run_adapter(tmp_path_factory.mktemp("plus-adapter") / "adapter.log", env)
    yield OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
    stop(process, signal.SIGTERM)


@pytest.fixture(scope="session")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 320x192 PNG on disk (a 5:3 aspect ratio that edits must keep)."""
    path = tmp_path_factory.mktemp("images") / "cat.png"
    path.write_bytes(encode_image((320, 192)))
    return path
