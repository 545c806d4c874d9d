"""Runs pipeline work off the event loop on one worker thread, in batches, behind a bounded
queue."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
import traceback
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

# The longest --batch_wait_ms: a request waiting longer for company than this would wait
# longer than most of its generations take.
MAX_BATCH_WAIT_MS = 10_000.0


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
        # Also refuses NaN, which fails every comparison (the worker would wait for ever),
        # and infinity (no wait takes it).
        if not 0 <= self.batch_wait_ms <= MAX_BATCH_WAIT_MS:
            raise ValueError(
                f"batch_wait_ms must be a number of milliseconds from 0 to "
                f"{MAX_BATCH_WAIT_MS:g}, not {self.batch_wait_ms}"
            )


class Unavailable(ServerNotReady):
    """A request this model cannot take or finish now. KServe answers it with 503 (gRPC
    UNAVAILABLE, from ``reason``); ``message`` says why and what the client may do."""

    def __init__(self, message: str):
        super().__init__()
        self.error_msg = message
        self.reason = message  # KServe's gRPC error handler aborts with `.reason`


class ServerBusy(Unavailable):
    """The queue is full; clients retry later."""

    def __init__(self, model_name: str, in_flight: int, capacity: int):
        super().__init__(
            f"Server is busy: model {model_name} has {in_flight} requests running or waiting, "
            f"the most it accepts ({capacity}). Retry later."
        )


class ServerStopping(Unavailable):
    """The server is shutting down and takes no new work; a retry reaches another replica."""

    def __init__(self, model_name: str):
        super().__init__(
            f"Server is shutting down: model {model_name} takes no new requests. Retry later."
        )


class ShutdownTimeout(Unavailable):
    """A request accepted before the shutdown had not finished when the time the shutdown
    leaves requests ran out; a retry reaches another replica."""

    def __init__(self, model_name: str, grace_seconds: float):
        super().__init__(
            f"Server is shutting down: model {model_name} did not finish this request in the "
            f"{grace_seconds:g} s a shutdown leaves requests. Retry later."
        )


class WorkerFailed(Unavailable):
    """The worker thread stopped on an unexpected error: the model serves nothing more, and
    the predictor needs a restart."""

    def __init__(self, model_name: str, cause: BaseException):
        super().__init__(
            f"Model {model_name} cannot serve: its pipeline worker stopped on an unexpected "
            f"error ({type(cause).__name__}: {cause}). Restart the predictor."
        )


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


def _drop_batch_frames(error: BaseException) -> None:
    """Let ``error``, caught in ``_execute`` to be handed to the batch's requests, hold no
    frame: its traceback's frames (the batch's tensors among their locals) and their callers
    (``_execute``'s, which holds the batch, its requests' futures, and so the error) would
    form a cycle, kept until the garbage collector's pass. Where it was raised stays, as a
    note that its log shows."""
    if error.__traceback__ is not None:
        lines = "".join(traceback.format_tb(error.__traceback__)).rstrip()
        error.add_note(f"Raised in the pipeline worker:\n{lines}")
        error.__traceback__ = None


def _settle(
    future: concurrent.futures.Future, result: object = None, error: BaseException | None = None
) -> None:
    """Give a future its outcome unless it has one already: a cancelled request's, or one
    failed by the end of the shutdown grace or a worker failure while its batch ran."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass


class Slot(Generic[JobT, ResultT]):
    """A request's place among a runner's ``capacity``, taken before its job is prepared so
    that a request the runner would refuse is refused before that work. ``run`` the job in
    it; leaving the ``with`` block without having run it frees the place."""

    def __init__(self, runner: PipelineRunner[JobT, ResultT]):
        self._runner = runner
        self.held = True  # counted by the runner, and not yet handed to a queued job

    def __enter__(self) -> Slot[JobT, ResultT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    async def prepare(self, make_job: Callable[[], JobT]) -> JobT:
        """``make_job()`` on a thread (an edit's images decoded), in this place. A thread
        cannot be stopped: if the caller is cancelled meanwhile, the place stays taken until
        the thread has finished, so that the capacity counts the work still under way."""
        preparing = asyncio.ensure_future(asyncio.to_thread(make_job))
        try:
            return await asyncio.shield(preparing)
        except asyncio.CancelledError:
            if self.held and not preparing.done():
                self.held = False  # the thread's end frees it instead of the ``with`` block
                preparing.add_done_callback(self._release_prepared)
            raise
        finally:
            preparing = None  # its error's traceback holds this frame: no cycle through it

    def _release_prepared(self, preparing: asyncio.Future[JobT]) -> None:
        if not preparing.cancelled():
            preparing.exception()  # retrieved: the request is gone, nobody else reads it
        self._runner._release_unqueued()

    async def run(self, job: JobT) -> ResultT:
        """Queue ``job`` in this place and wait for its result (``PipelineRunner.run``)."""
        return await self._runner._run(job, self)

    def release(self) -> None:
        """Free the place if no queued job holds it."""
        if self.held:
            self.held = False
            self._runner._release_unqueued()


class PipelineRunner(Generic[JobT, ResultT]):
    """One worker thread per GPU: pipeline calls never overlap and never block the event loop.

    ``process`` turns a batch of jobs into one result per job. Requests are counted, whatever
    their number of images: at most ``max_batch_size + max_queue_size`` may be accepted and
    unfinished (running, waiting, or holding a ``Slot`` while their job is prepared; with
    batching off, one running and ``max_queue_size`` waiting). Past that, ``reserve`` (and
    ``run``) raise ``ServerBusy`` at once instead of queueing without bound. A request counts
    until its work has really finished, even when its caller gave up earlier, so the count
    always matches what the GPU still has to do; a request cancelled before its batch starts
    leaves the queue at once and never runs, and a running batch whose every request was
    cancelled stops at ``process``'s next ``stop_if_abandoned``. Once closed, new requests get
    ``ServerStopping`` (503), while a request that took its place before (an edit whose images
    were being decoded) still runs, and the worker thread waits for it; if the worker thread
    ever stops on an unexpected error, every request gets ``WorkerFailed`` (503).
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
        self._pending = 0  # read and written on the event loop only
        # Places reserved whose job is not queued yet (under the lock: the worker waits for
        # them before it ends), and, once the shutdown's grace has ended, what they then get.
        self._preparing = 0
        self._expired: Callable[[], BaseException] | None = None
        self._waiting: deque[_Waiting[JobT]] = deque()
        self._calls: deque[_Call] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._failure: BaseException | None = None
        self._running: list[_Waiting[JobT]] = []
        # The requests of a failed batch still to be retried one by one (``_execute``).
        self._retries: list[_Waiting[JobT]] = []
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

    @property
    def failure(self) -> WorkerFailed | None:
        """Why the worker thread stopped on an unexpected error, or None while it works."""
        return None if self._failure is None else WorkerFailed(self.model_name, self._failure)

    def reserve(self) -> Slot[JobT, ResultT]:
        """A place for a request about to be prepared (``Slot``); ``ServerBusy`` if every
        place is taken, ``ServerStopping`` once closed, ``WorkerFailed`` after a failure."""
        if (failure := self.failure) is not None:
            raise failure
        if self._closed:
            raise ServerStopping(self.model_name)
        if self._pending >= self.capacity:
            raise ServerBusy(self.model_name, self._pending, self.capacity)
        self._pending += 1
        self._depth.set(self._pending)
        with self._condition:
            self._preparing += 1
        return Slot(self)

    async def run(self, job: JobT) -> ResultT:
        """Run ``job`` in a batch once its turn comes (``reserve`` and ``Slot.run``)."""
        with self.reserve() as slot:
            return await slot.run(job)

    async def _run(self, job: JobT, slot: Slot[JobT, ResultT]) -> ResultT:
        if not slot.held:  # run already, or freed: its place is no longer counted
            raise RuntimeError("a place runs one job, and only before it is freed")
        loop = asyncio.get_running_loop()
        waiting = _Waiting(job, time.monotonic())
        with self._condition:
            # Not refused for a shutdown begun since its place was reserved: it was accepted.
            if (failure := self.failure) is not None:
                raise failure
            if self._expired is not None:
                raise self._expired()
            self._preparing -= 1
            self._waiting.append(waiting)
            self._condition.notify()
        # From now on the job's end frees the place: its done callback, run on this loop.
        slot.held = False
        waiting.future.add_done_callback(lambda _: self._finish_on(loop))
        try:
            return await asyncio.wrap_future(waiting.future)
        except asyncio.CancelledError:
            self._abandon(waiting)
            raise
        finally:
            # The job's error holds this frame in its traceback, and the future the error:
            # a cycle, which would keep the request until the garbage collector's pass.
            waiting = None

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
            if (failure := self.failure) is not None:
                raise failure
            if self._closed:
                raise RuntimeError(f"the pipeline runner of {self.model_name} is shut down")
            self._calls.append(call)
            self._condition.notify()
        return call.future.result()

    def close(self, grace_seconds: float | None = None) -> None:
        """Take no new work, and let the worker thread end once the accepted requests (those
        still being prepared included) are done; returns at once (KServe stops models on its
        event loop). Requests still unfinished ``grace_seconds`` later (None: no limit) fail
        with ``ShutdownTimeout``, and their batch stops at its next step. Later calls change
        nothing."""
        with self._condition:
            if self._closed:
                return
            self._closed = True
            self._condition.notify()
        if grace_seconds is not None:
            threading.Thread(
                target=self._expire_after,
                args=(grace_seconds,),
                name=f"pipeline-{self.model_name}-grace",
                daemon=True,
            ).start()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the worker thread to end (after ``close``);
        whether it has."""
        self._worker.join(timeout)
        return not self._worker.is_alive()

    def _expire_after(self, grace_seconds: float) -> None:
        if self.join(grace_seconds):
            return
        failed = self._fail_unfinished(
            functools.partial(ShutdownTimeout, self.model_name, grace_seconds)
        )
        if failed:
            logger.warning(
                "Model %s: %d requests had not finished %g s into the shutdown; they get a 503",
                self.model_name,
                failed,
                grace_seconds,
            )

    def _fail_unfinished(self, error: Callable[[], BaseException]) -> int:
        """Fail every request waiting or running (the running batch stops at its next step)
        and every call, each with a new ``error()``, and those still being prepared when
        they come to queue their job; how many requests, those being prepared included."""
        with self._condition:
            self._expired = error
            unfinished = [*self._waiting, *self._running, *self._retries]
            preparing = self._preparing
            for item in unfinished:
                item.abandoned = True
                _settle(item.future, error=error())
            for call in self._calls:
                _settle(call.future, error=error())
            self._waiting.clear()
            self._calls.clear()
            self._condition.notify()
        return len(unfinished) + preparing

    def _abandon(self, waiting: _Waiting[JobT]) -> None:
        """Its caller gave up: waiting, it leaves the queue at once (no room taken in the
        batch being gathered); running, its batch stops once all its requests are abandoned."""
        with self._condition:
            waiting.abandoned = True
            self._condition.notify()

    def _finish(self) -> None:
        self._pending -= 1
        self._depth.set(self._pending)

    def _release_unqueued(self) -> None:
        """A reserved place freed without its job queued (its preparation failed)."""
        with self._condition:
            self._preparing -= 1
            self._condition.notify()
        self._finish()

    def _finish_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """``_finish`` on ``loop``, from any thread; nothing once the loop has closed (a
        batch that ends after the servers, while the process waits for the worker)."""
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(self._finish)

    def _work(self) -> None:
        """The worker thread. An error outside a batch's own (which ``_execute`` hands to its
        requests) stops it: then every request and call fails with ``WorkerFailed`` rather
        than wait for ever."""
        batch: list[_Waiting[JobT]] = []
        try:
            while (work := self._next_work()) is not None:
                if isinstance(work, _Call):
                    try:
                        work.future.set_result(work.function())
                    except BaseException as exc:
                        work.future.set_exception(exc)
                elif work:
                    batch = work
                    self._execute(batch)
        except BaseException as error:
            logger.exception("The pipeline worker of model %s stopped", self.model_name)
            with self._condition:
                self._failure = error
                self._closed = True
            failed = functools.partial(WorkerFailed, self.model_name, error)
            for item in batch:  # the batch that raised it, if one did: no longer running
                _settle(item.future, error=failed())
            self._fail_unfinished(failed)

    def _next_work(self) -> _Call | list[_Waiting[JobT]] | None:
        """The next call, else the next batch, marked running, once it is full or its oldest
        request has waited long enough (empty if all its callers gave up meanwhile); None
        once closed with nothing left and nothing being prepared (or the grace ended)."""
        wait_s = self.policy.batch_wait_ms / 1000
        with self._condition:
            while True:
                self._drop_abandoned()
                while not self._waiting and not self._calls and not self._drained():
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
            # Under the lock, so that nothing fails them between here and the batch's run.
            self._running = [item for item in batch if item.future.set_running_or_notify_cancel()]
            return self._running

    def _drained(self) -> bool:
        """Closed, with no reserved place left to queue a job (called with the lock held)."""
        return self._closed and (self._preparing == 0 or self._expired is not None)

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
        """Run a batch (marked running); if a batch of several fails, run its requests one
        by one, so that one bad request (or a batch too big for the GPU) does not fail the
        others. Results that cannot be handed out (not one per request) fail the batch, not
        the worker."""
        self._batch_sizes.observe(len(batch))
        try:
            results = self.process([item.job for item in batch])
        except BatchAbandoned as exc:
            logger.info("Stopped a batch: %s", exc)
            for item in batch:
                _settle(item.future, error=exc)
            return
        except Exception as exc:
            _drop_batch_frames(exc)
            if len(batch) == 1:
                _settle(batch[0].future, error=exc)
                return
            logger.warning("A batch of %d failed (%s); retrying one by one", len(batch), str(exc))
            with self._condition:
                self._retries, self._running = list(batch), []
            self._retry_one_by_one(batch)
            return
        finally:
            with self._condition:
                self._running = []
        try:
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for a batch of {len(batch)} requests")
            for item, result in zip(batch, results, strict=True):
                _settle(item.future, result)
        except Exception as exc:
            _drop_batch_frames(exc)
            for item in batch:
                _settle(item.future, error=exc)

    def _retry_one_by_one(self, batch: list[_Waiting[JobT]]) -> None:
        """Run a failed batch's requests alone, but those failed or left meanwhile."""
        for item in batch:
            with self._condition:
                self._retries.remove(item)
                if item.future.done():  # failed meanwhile: the shutdown grace ended
                    continue
                if item.abandoned:  # its caller left: settled, so that it stops counting
                    _settle(item.future, error=BatchAbandoned("its caller left"))
                    continue
                self._running = [item]
            self._execute([item])
