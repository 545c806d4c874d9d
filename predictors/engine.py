"""Runs pipeline calls off the event loop, one at a time, behind a bounded queue."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

from kserve.errors import ServerNotReady

from predictors.metrics import QUEUE_DEPTH

T = TypeVar("T")


class ServerBusy(ServerNotReady):
    """The queue is full. KServe answers it with 503 (gRPC UNAVAILABLE); clients retry later."""

    def __init__(self, model_name: str, running: int, max_queue_size: int):
        super().__init__()
        self.error_msg = (
            f"Server is busy: model {model_name} has {running} request running and "
            f"{max_queue_size} waiting, the most it queues. Retry later."
        )


class PipelineRunner:
    """One worker thread per GPU: pipeline calls never overlap and never block the loop.

    Up to ``max_queue_size`` requests wait behind the running one; past that, ``run``
    raises ``ServerBusy`` at once instead of queueing without bound. A request counts as
    pending until its work has really finished, even when its caller gave up earlier, so
    the count always matches what the GPU still has to do.
    """

    def __init__(self, model_name: str, max_queue_size: int):
        if max_queue_size < 0:
            raise ValueError("max_queue_size must be >= 0")
        self.model_name = model_name
        self.max_queue_size = max_queue_size
        self._pending = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"pipeline-{model_name}"
        )
        self._depth = QUEUE_DEPTH.labels(model_name=model_name)
        self._depth.set(0)

    @property
    def pending(self) -> int:
        """Requests accepted and not finished (the running one included)."""
        return self._pending

    async def run(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the worker thread once its turn comes; raise ``ServerBusy`` if full."""
        if self._pending > self.max_queue_size:
            raise ServerBusy(self.model_name, 1, self.max_queue_size)
        loop = asyncio.get_running_loop()
        self._pending += 1
        self._depth.set(self._pending)
        future = self._executor.submit(work)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._finish))
        return await asyncio.wrap_future(future)

    def _finish(self) -> None:
        self._pending -= 1
        self._depth.set(self._pending)

    def shutdown(self) -> None:
        """Finish the queued work, then stop the worker thread."""
        self._executor.shutdown(wait=True)
