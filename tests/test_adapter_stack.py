"""The local stack's lifecycle: it stops every child on a signal or when one of them dies.

(Starting, readiness and Ctrl-C at the end are covered by the session ``stack`` fixture.)
"""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import pytest

from tests.adapter_stack import alive, start_stack, stop

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
