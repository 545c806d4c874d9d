"""Processes for the adapter tests: the local stack (``python -m openai_adapter.local_stack``,
what ``qwen-image-stack`` and ``make run`` run) and single adapters, on free loopback ports."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image

from tests.servers import PROJECT_ROOT, free_port

# Small limits so that error tests can reach them; the default size (1664x928) still fits.
# Requests that name no quality or steps (the README's curl examples, the defaults test) run
# 2 steps instead of the predictor's 50: the tiny pipelines take minutes for 50 on 2 CPU cores.
STACK_ENV = {
    "QWEN_MIN_SIZE": "64",
    "QWEN_MAX_IMAGES": "4",
    "QWEN_MAX_STEPS": "60",
    "QWEN_ADAPTER_QUALITY_STEPS": json.dumps({"auto": 2, "low": 20, "high": 50, "max": 100}),
}
STARTUP_TIMEOUT = 300
READY_LINE = "[stack] ready: OpenAI base URL "
API_KEY = "test-key"


@dataclass
class Stack:
    """A running ``local_stack`` process and where its output goes."""

    process: subprocess.Popen
    log_path: Path
    port: int
    generation_port: int
    edit_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def generation_url(self) -> str:
        """The text-to-image predictor's base URL."""
        return f"http://127.0.0.1:{self.generation_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def child_pids(self) -> dict[str, int]:
        """The children that the stack says it started, by name."""
        return {
            name: int(pid) for name, pid in re.findall(r"started (\S+) \(pid (\d+)\)", self.log())
        }

    def wait_for(self, condition: Callable[[str], bool], timeout: float) -> bool:
        """Wait until ``condition(log)`` holds; False on timeout or when the stack exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition(self.log()):
                return True
            if self.process.poll() is not None:
                return condition(self.log())
            time.sleep(0.2)
        return False


def start_stack(log_path: Path, *extra_args: str, port: int | None = None) -> Stack:
    """Run the local stack as the README does, on free ports, with the test limits."""
    ports = [port or free_port(), *(free_port() for _ in range(4))]
    args = [
        *("--port", str(ports[0]), "--generation-port", str(ports[1])),
        *("--edit-port", str(ports[2]), "--generation-grpc-port", str(ports[3])),
        *("--edit-grpc-port", str(ports[4]), *extra_args),
    ]
    env = {**os.environ, **STACK_ENV}
    env.pop("QWEN_ADAPTER_API_KEY", None)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "openai_adapter.local_stack", *args],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Stack(process, log_path, ports[0], ports[1], ports[2])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop(process: subprocess.Popen, signum: int = signal.SIGINT, timeout: float = 60) -> int:
    """Signal ``process`` and wait for it (killing it after ``timeout``)."""
    process.send_signal(signum)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def run_adapter(log_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Run ``python -m openai_adapter`` with ``env``; the process and its base URL."""
    port = free_port()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "openai_adapter", "--port", str(port)],
            cwd=PROJECT_ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base}/health/live", timeout=1).status_code == 200:
                return process, f"{base}/v1"
        except httpx.HTTPError:
            time.sleep(0.1)
    stop(process, signal.SIGTERM)
    raise RuntimeError(f"adapter did not start:\n{log_path.read_text()}")


def encode_image(size: tuple[int, int], fmt: str = "PNG") -> bytes:
    """A small picture (a gradient and a square) as an image file."""
    width, height = size
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    image.paste((220, 40, 40), (width // 4, height // 4, width // 2, height // 2))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def encode_mask(size: tuple[int, int], box: tuple[int, int, int, int], fmt: str = "PNG") -> bytes:
    """An OpenAI-style mask file: opaque, and fully transparent in ``box`` (left, top,
    right, bottom), the area to edit."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    buffer = io.BytesIO()
    mask.save(buffer, fmt)
    return buffer.getvalue()
