"""The local stack's lifecycle: it stops every child on a signal or when one of them dies.

(Starting, readiness and Ctrl-C at the end are covered by the session ``stack`` fixture.)
"""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.adapter_stack import READY_LINE, STARTUP_TIMEOUT, alive, start_stack, stop
from tests.servers import wait_for_queue_depth_at

CHILDREN = {"generation-predictor", "edit-predictor", "adapter"}


def test_a_child_that_dies_stops_the_stack(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stack = start_stack(tmp_path / "stack.log", port=port)
        try:
            status = stack.process.wait(timeout=120)
        finally:
            if stack.process.poll() is None:
                stop(stack.process, signal.SIGKILL)
    log = stack.log()
    assert status == 1, log[-3000:]
    assert re.search(r"\[stack\] adapter exited with status [1-9]\d*; its last lines:", log)
    assert "address already in use" in log.split("its last lines:")[1]
    pids = stack.child_pids()
    assert set(pids) == CHILDREN
    assert not [name for name, pid in pids.items() if alive(pid)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_during_startup_stops_everything(tmp_path: Path, signum: signal.Signals):
    """SIGTERM, or SIGHUP from a closed terminal, stops the children too: they run in
    sessions of their own, so no signal reaches them but the stack's."""
    stack = start_stack(tmp_path / "stack.log")
    started = stack.wait_for(lambda log: log.count("[stack] started ") == 3, 60)
    status = stop(stack.process, signum)
    log = stack.log()
    assert started and status == 0, log[-3000:]
    assert f"[stack] {signum.name}: stopping" in log and log.rstrip().endswith("[stack] stopped")
    pids = stack.child_pids()
    assert set(pids) == CHILDREN
    assert not [name for name, pid in pids.items() if alive(pid)]


def test_a_stopping_stack_answers_the_requests_it_holds(tmp_path: Path):
    """Ctrl-C with generations running or queued: the predictors' shutdown answers them with
    a 503 that the adapter passes on, before the stack's SIGKILL would cut them."""
    stack = start_stack(tmp_path / "stack.log", "--stop-timeout", "8")
    try:
        assert stack.wait_for(lambda log: READY_LINE in log, STARTUP_TIMEOUT), stack.log()[-3000:]
        answers: list[httpx.Response] = []

        def generate() -> None:  # 60 steps at 1664x928: some 25 s on a CPU
            body = {"prompt": "a long one", "num_inference_steps": 60}
            url = f"{stack.base_url}/images/generations"
            answers.append(httpx.post(url, json=body, timeout=60))

        clients = [threading.Thread(target=generate) for _ in range(2)]
        for client in clients:
            client.start()
        wait_for_queue_depth_at(stack.generation_url, "qwen-image", 2)  # running and queued
        started = time.monotonic()
        stack.process.send_signal(signal.SIGINT)
        status = stack.process.wait(timeout=30)
        stopped_in = time.monotonic() - started
        for client in clients:
            client.join(timeout=30)
    finally:
        if stack.process.poll() is None:
            stop(stack.process, signal.SIGKILL)
    log = stack.log()
    assert status == 0 and "did not stop in time" not in log, log[-3000:]
    assert stopped_in < 8
    assert len(answers) == 2
    for answer in answers:
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["code"] == "predictor_busy", error
        assert "shutdown" in error["message"], error
