"""``qwen-image-stack``: both predictors and the adapter on this machine, in one command.

Starts ``predictors.generation``, ``predictors.edit`` (tiny random-weight models unless
``QWEN_IMAGE_LOCATION`` / ``QWEN_IMAGE_EDIT_LOCATION`` are set; every ``QWEN_*`` variable
passes through) and the adapter, waits until the adapter reports ready, prints its URL and
runs until Ctrl-C or SIGTERM. Then, or as soon as any child exits, it stops them all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from typing import TextIO

from predictors.contract import EDIT_MODEL_NAME, GENERATION_MODEL_NAME

TAIL_LINES = 40
# Seconds a stopping stack leaves the adapter to pass on the predictors' last answers.
_ANSWER_MARGIN_SECONDS = 5
_print_lock = threading.Lock()


def _say(text: str, stream: TextIO | None = None) -> None:
    # A closed terminal (SIGHUP) makes writes fail: the children's output is still drained,
    # so that none of them blocks on a full pipe while it stops.
    with _print_lock, contextlib.suppress(OSError):
        print(text, file=stream or sys.stdout, flush=True)


class Child:
    """One child process in its own process group, its output echoed with a name prefix."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name = name
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._pump, name=f"{name}-log", daemon=True)
        self._reader.start()
        _say(f"[stack] started {name} (pid {self.process.pid}): {' '.join(argv[1:])}")

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            _say(f"[{self.name}] {line}")

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child's whole process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def wait(self, deadline: float) -> None:
        """Wait for the child until ``deadline``, then SIGKILL whatever is left of its group."""
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _say(f"[stack] {self.name} did not stop in time; killing it")
        self.signal(signal.SIGKILL)
        self.process.wait()
        self._reader.join(timeout=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qwen-image-stack",
        description="Run both Qwen-Image predictors and the OpenAI adapter on this machine.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="adapter interface")
    parser.add_argument("--port", type=int, default=8000, help="adapter port")
    parser.add_argument("--generation-port", type=int, default=8081, help="predictor REST port")
    parser.add_argument("--edit-port", type=int, default=8082, help="edit predictor REST port")
    parser.add_argument("--generation-grpc-port", type=int, default=9081)
    parser.add_argument("--edit-grpc-port", type=int, default=9082)
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=900.0,
        help="seconds to wait for readiness (real weights load slowly)",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=20.0,
        help="seconds between SIGTERM and SIGKILL when stopping; the predictors answer what "
        f"they still hold with a 503 {_ANSWER_MARGIN_SECONDS} s before",
    )
    return parser.parse_args(argv)


def _commands(args: argparse.Namespace) -> list[tuple[str, list[str], dict[str, str]]]:
    """Name, argv and environment of each child."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The predictors' own shutdown ends with a 503 for each request still unfinished, which
    # the adapter passes on, before the SIGKILL would cut them.
    grace = max(int(args.stop_timeout) - _ANSWER_MARGIN_SECONDS, 1)
    predictor_env = {**env, "QWEN_SHUTDOWN_GRACE_SECONDS": str(grace)}
    python = sys.executable
    predictors = [
        ("generation", GENERATION_MODEL_NAME, args.generation_port, args.generation_grpc_port),
        ("edit", EDIT_MODEL_NAME, args.edit_port, args.edit_grpc_port),
    ]
    commands = [
        (
            f"{kind}-predictor",
            [
                *(python, "-m", f"predictors.{kind}", "--model_name", model),
                *("--http_port", str(port), "--grpc_port", str(grpc_port)),
            ],
            predictor_env,
        )
        for kind, model, port, grpc_port in predictors
    ]
    adapter_env = {
        **env,
        "QWEN_ADAPTER_GENERATION_URL": f"http://127.0.0.1:{args.generation_port}",
        "QWEN_ADAPTER_EDIT_URL": f"http://127.0.0.1:{args.edit_port}",
        "QWEN_ADAPTER_GENERATION_MODEL": GENERATION_MODEL_NAME,
        "QWEN_ADAPTER_EDIT_MODEL": EDIT_MODEL_NAME,
    }
    adapter = [python, "-m", "openai_adapter", "--host", args.host, "--port", str(args.port)]
    commands.append(("adapter", adapter, adapter_env))
    return commands


def adapter_url(host: str, port: int) -> str:
    """The adapter's base URL for a client on this machine: an any-address bind is reached
    on loopback, and an IPv6 literal goes in brackets."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def run(args: argparse.Namespace) -> int:
    """Start the children and supervise them; the exit status of the stack."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        _say(f"[stack] {signal.Signals(signum).name}: stopping")
        stop.set()

    # SIGHUP: the terminal running the stack was closed.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, request_stop)

    base = adapter_url(args.host, args.port)
    children: list[Child] = []
    status = 0
    try:
        for name, argv, env in _commands(args):
            if not stop.is_set():
                children.append(Child(name, argv, env))
        deadline = time.monotonic() + args.startup_timeout
        ready = False
        while not stop.wait(0.5):
            dead = next((c for c in children if c.process.poll() is not None), None)
            if dead is not None:
                _report_death(dead)
                status = 1
                break
            if not ready and _is_ready(f"{base}/health/ready"):
                ready = True
                _say(
                    f"[stack] ready: OpenAI base URL {base}/v1 (API docs {base}/docs); "
                    "press Ctrl-C to stop"
                )
            if not ready and time.monotonic() > deadline:
                _say(f"[stack] not ready after {args.startup_timeout:g} s; stopping", sys.stderr)
                status = 1
                break
    finally:
        for child in children:
            child.signal(signal.SIGTERM)
        stop_deadline = time.monotonic() + args.stop_timeout
        for child in children:
            child.wait(stop_deadline)
        _say("[stack] stopped")
    return status


def _report_death(child: Child) -> None:
    child.wait(time.monotonic() + 2)  # collect its last lines
    lines = "\n".join(f"  {line}" for line in child.tail)
    _say(
        f"[stack] {child.name} exited with status {child.process.returncode}; "
        f"its last lines:\n{lines}\n[stack] stopping everything",
        sys.stderr,
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    sys.exit(run(parse_args(argv)))


if __name__ == "__main__":
    main()
