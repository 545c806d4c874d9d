"""Runs pipeline work off the event loop on one worker thread, in batches, behind a bounded
queue."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from kserve.errors import ServerNotReady

from predictors.metrics import BATCH_REQUESTS, QUEUE_DEPTH

logger = logging.getLogger(__name__)


class Batchable(Protocol):
    """A unit of work that may share a pipeline call with others of the same key."""

    @property
    def batch_key(self) -> Hashable: ...

    @property
    def num_images(self) -> int: ...


JobT = TypeVar("JobT", bound=Batchable)
ResultT = TypeVar("ResultT")
T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    """How requests are grouped into one pipeline call.

    A batch takes the oldest waiting request, then later ones with the same batch key (same
    size, steps and CFG) while its images total at most ``max_batch_size``; one request with
    more images than that runs alone. The oldest request waits at most ``batch_wait_ms``
    after its arrival for others to join (requests that queued while the GPU was busy join at
    once). ``max_batch_size=1`` turns cross-request batching off.
    """

    max_batch_size: int = 1
    batch_wait_ms: float = 50.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.batch_wait_ms < 0:
            raise ValueError("batch_wait_ms must be >= 0")


class ServerBusy(ServerNotReady):
    """The queue is full. KServe answers it with 503 (gRPC UNAVAILABLE); clients retry later."""

    def __init__(self, model_name: str, in_flight: int, capacity: int):
        super().__init__()
        self.error_msg = (
            f"Server is busy: model {model_name} has {in_flight} requests running or waiting, "
            f"the most it accepts ({capacity}). Retry later."
        )
        self.reason = self.error_msg  # KServe's gRPC error handler aborts with `.reason`


class ServerStopping(ServerNotReady):
    """The server is shutting down and takes no new work. KServe answers it with 503 (gRPC
    UNAVAILABLE); a retry reaches another replica."""

    def __init__(self, model_name: str):
        super().__init__()
        self.error_msg = (
            f"Server is shutting down: model {model_name} takes no new requests. Retry later."
        )
        self.reason = self.error_msg


class BatchAbandoned(Exception):
    """Every request of the running batch was given up by its caller: ``process`` raises it
    (through ``PipelineRunner.stop_if_abandoned``) to stop work that nobody waits for."""


@dataclass
class _Waiting(Generic[JobT]):
    job: JobT
    arrived: float
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    abandoned: bool = False  # its caller gave up (set under the lock, read by the worker)


@dataclass
class _Call:
    function: Callable[[], object]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class PipelineRunner(Generic[JobT, ResultT]):
    """One worker thread per GPU: pipeline calls never overlap and never block the event loop.

    ``process`` turns a batch of jobs into one result per job. Requests are counted, whatever
    their number of images: at most ``max_batch_size + max_queue_size`` may be accepted and
    unfinished (running or waiting; with batching off, one running and ``max_queue_size``
    waiting). Past that, ``run`` raises ``ServerBusy`` at once instead of queueing without
    bound. A request counts until its work has really finished, even when its caller gave up
    earlier, so the count always matches what the GPU still has to do; a request cancelled
    before its batch starts leaves the queue at once and never runs, and a running batch
    whose every request was cancelled stops at ``process``'s next ``stop_if_abandoned``.
    Once shutting down, ``run`` raises ``ServerStopping`` (503).
    """

    def __init__(
        self,
        model_name: str,
        process: Callable[[list[JobT]], list[ResultT]],
        max_queue_size: int,
        policy: BatchPolicy | None = None,
    ):
        if max_queue_size < 0:
            raise ValueError("max_queue_size must be >= 0")
        self.model_name = model_name
        self.process = process
        self.policy = policy or BatchPolicy()
        self.capacity = self.policy.max_batch_size + max_queue_size
        self._pending = 0
        self._waiting: deque[_Waiting[JobT]] = deque()
        self._calls: deque[_Call] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._running: list[_Waiting[JobT]] = []
        self._depth = QUEUE_DEPTH.labels(model_name=model_name)
        self._depth.set(0)
        self._batch_sizes = BATCH_REQUESTS.labels(model_name=model_name)
        self._worker = threading.Thread(
            target=self._work, name=f"pipeline-{model_name}", daemon=True
        )
        self._worker.start()

    @property
    def pending(self) -> int:
        """Requests accepted and not finished (the running ones included)."""
        return self._pending

    def check_capacity(self) -> None:
        """Raise ``ServerBusy`` if a request arriving now would be refused: lets a caller
        refuse before costly preparation (``run`` checks again)."""
        if self._pending >= self.capacity:
            raise ServerBusy(self.model_name, self._pending, self.capacity)

    async def run(self, job: JobT) -> ResultT:
        """Run ``job`` in a batch once its turn comes; raise ``ServerBusy`` if full, and
        ``ServerStopping`` once shutting down."""
        self.check_capacity()
        loop = asyncio.get_running_loop()
        waiting = _Waiting(job, time.monotonic())
        with self._condition:
            if self._closed:
                raise ServerStopping(self.model_name)
            self._waiting.append(waiting)
            self._condition.notify()
        # Counted once queued: its done callback, run on this loop, cannot come before.
        self._pending += 1
        self._depth.set(self._pending)
        waiting.future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._finish))
        try:
            return await asyncio.wrap_future(waiting.future)
        except asyncio.CancelledError:
            self._abandon(waiting)
            raise

    def stop_if_abandoned(self, where: str) -> None:
        """Raise ``BatchAbandoned`` when every request of the running batch has been given up
        by its caller. ``process`` calls it between steps (on the worker thread), so that a
        batch nobody waits for any more frees the GPU early; ``where`` says when, for the log."""
        running = self._running
        if running and all(item.abandoned for item in running):
            raise BatchAbandoned(f"every caller of a batch of {len(running)} left; {where}")

    def call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the worker thread, before any waiting batch, and return what
        it returns (or raise what it raises): for work that must run where the pipeline
        calls run, such as the load-time warm-up, which records CUDA graphs (per thread)."""
        call = _Call(function)
        with self._condition:
            if self._closed:
                raise RuntimeError(f"the pipeline runner of {self.model_name} is shut down")
            self._calls.append(call)
            self._condition.notify()
        return call.future.result()

    def shutdown(self) -> None:
        """Finish the queued work, then stop the worker thread."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._worker.join()

    def _abandon(self, waiting: _Waiting[JobT]) -> None:
        """Its caller gave up: waiting, it leaves the queue at once (no room taken in the
        batch being gathered); running, its batch stops once all its requests are abandoned."""
        with self._condition:
            waiting.abandoned = True
            self._condition.notify()

    def _finish(self) -> None:
        self._pending -= 1
        self._depth.set(self._pending)

    def _work(self) -> None:
        while (work := self._next_work()) is not None:
            if isinstance(work, _Call):
                try:
                    work.future.set_result(work.function())
                except BaseException as exc:
                    work.future.set_exception(exc)
                continue
            started = [item for item in work if item.future.set_running_or_notify_cancel()]
            if started:
                self._execute(started)

    def _next_work(self) -> _Call | list[_Waiting[JobT]] | None:
        """The next call, else the next batch once it is full or its oldest request has
        waited long enough; None once closed with nothing left."""
        wait_s = self.policy.batch_wait_ms / 1000
        with self._condition:
            while True:
                self._drop_abandoned()
                while not self._waiting and not self._calls and not self._closed:
                    self._condition.wait()
                    self._drop_abandoned()
                if self._calls:
                    return self._calls.popleft()
                if not self._waiting:
                    return None
                batch = self._select()
                images = sum(item.job.num_images for item in batch)
                remaining = self._waiting[0].arrived + wait_s - time.monotonic()
                if images >= self.policy.max_batch_size or remaining <= 0 or self._closed:
                    break
                self._condition.wait(remaining)
            for item in batch:
                self._waiting.remove(item)
        return batch

    def _drop_abandoned(self) -> None:
        """Forget the waiting requests whose callers gave up (called with the lock held)."""
        if any(item.abandoned for item in self._waiting):
            self._waiting = deque(item for item in self._waiting if not item.abandoned)

    def _select(self) -> list[_Waiting[JobT]]:
        """The oldest request and the later compatible ones that fit beside it."""
        first = self._waiting[0]
        batch, images = [first], first.job.num_images
        for item in list(self._waiting)[1:]:
            fits = images + item.job.num_images <= self.policy.max_batch_size
            if fits and item.job.batch_key == first.job.batch_key:
                batch.append(item)
                images += item.job.num_images
        return batch

    def _execute(self, batch: list[_Waiting[JobT]]) -> None:
        """Run a batch; if a batch of several fails, run its requests one by one, so that
        one bad request (or a batch too big for the GPU) does not fail the others. Results
        that cannot be handed out (not one per request) fail the batch, not the worker."""
        self._batch_sizes.observe(len(batch))
        self._running = batch
        try:
            results = self.process([item.job for item in batch])
        except BatchAbandoned as exc:
            logger.info("Stopped a batch: %s", exc)
            for item in batch:
                item.future.set_exception(exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            logger.warning("A batch of %d failed (%s); retrying one by one", len(batch), exc)
            for item in batch:
                self._execute([item])
            return
        finally:
            self._running = []
        try:
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for a batch of {len(batch)} requests")
            for item, result in zip(batch, results, strict=True):
                item.future.set_result(result)
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
