"""Start real predictor processes on loopback for tests, and stop them afterwards."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from starlette.types import ASGIApp

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = PROJECT_ROOT.parent / "shared"


# Ports for test servers, below Linux's default ephemeral range (32768-60999): a predictor
# binds its port only after loading its model, tens of seconds after the port is picked, and
# meanwhile any outgoing connection on this machine may take an ephemeral port as its own.
TEST_PORTS = range(20000, 32768)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now, outside the ephemeral range."""
    for port in random.sample(TEST_PORTS, 100):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {TEST_PORTS}")


@dataclass
class RunningPredictor:
    """A predictor process serving one model on loopback."""

    model_name: str
    http_port: int
    grpc_port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{self.model_name}/infer"

    @property
    def stream_url(self) -> str:
        return f"{self.infer_url}_stream"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def server_sent_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    """The (event, JSON data) pairs of a streamed answer, as they arrive."""
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield event, json.loads(line.removeprefix("data: "))


def wait_for_ok(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    """Block until ``url`` answers 200; fail with the log's tail if ``process`` exits first or
    the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{process.args} exited early:\n{tail}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    tail = log_path.read_text(errors="replace")[-3000:]
    raise TimeoutError(f"{url} not ready after {timeout} s:\n{tail}")


def wait_until_ready(predictor: RunningPredictor, timeout: float = 180) -> None:
    """Block until the model's readiness endpoint answers 200; fail with the log otherwise."""
    ready_url = f"{predictor.url}/v2/models/{predictor.model_name}/ready"
    wait_for_ok(ready_url, predictor.process, predictor.log_path, timeout)


def wait_for_queue_depth(predictor: RunningPredictor, depth: int, timeout: float = 30) -> None:
    """Block until the predictor's queue-depth metric reads ``depth`` (requests accepted and
    unfinished); fail after ``timeout`` seconds."""
    wait_for_queue_depth_at(predictor.url, predictor.model_name, depth, timeout)


def wait_for_queue_depth_at(url: str, model_name: str, depth: int, timeout: float = 30) -> None:
    """``wait_for_queue_depth`` for the predictor serving ``model_name`` at base ``url``."""
    sample = f'qwen_image_queue_depth{{model_name="{model_name}"}} {depth:.1f}'
    deadline = time.monotonic() + timeout
    while sample not in httpx.get(f"{url}/metrics").text:
        assert time.monotonic() < deadline, f"the queue never held {depth} request(s)"
        time.sleep(0.05)


@contextmanager
def run_predictor(
    module: str, model_name: str, log_dir: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[RunningPredictor]:
    """Run ``python -m <module>`` with ``args`` until the block ends."""
    http_port, grpc_port = free_port(), free_port()
    log_path = log_dir / f"{model_name}-{http_port}.log"
    command = [
        sys.executable,
        "-m",
        module,
        f"--http_port={http_port}",
        f"--grpc_port={grpc_port}",
        *args,
    ]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    predictor = RunningPredictor(model_name, http_port, grpc_port, process, log_path)
    try:
        wait_until_ready(predictor)
        yield predictor
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def uvicorn_server(app: ASGIApp) -> Iterator[str]:
    """The base URL of ``app`` served by uvicorn on loopback, in a thread."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(30)
