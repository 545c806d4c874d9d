"""The batching runner with a fake pipeline: grouping, limits, backpressure, failures."""

from __future__ import annotations

import asyncio
import gc
import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from kserve.errors import ServerNotReady

from predictors.engine import (
    BatchPolicy,
    PipelineRunner,
    ServerBusy,
    ServerStopping,
    ShutdownTimeout,
)
from tests.cycles import collector_off, cyclic_garbage, frames_holding


@dataclass(frozen=True)
class FakeJob:
    name: str
    batch_key: str = "512x512"
    num_images: int = 1
    fail: bool = False


class FakePipeline:
    """Records the batches it is given; a job with ``fail`` fails its whole batch."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[list[str]] = []
        self.gate = gate

    def __call__(self, jobs: list[FakeJob]) -> list[str]:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append([job.name for job in jobs])
        if any(job.fail for job in jobs):
            raise RuntimeError("bad job")
        return [f"done {job.name}" for job in jobs]


async def run_all(runner: PipelineRunner, jobs: list[FakeJob]) -> list:
    return await asyncio.gather(*(runner.run(job) for job in jobs), return_exceptions=True)


def test_compatible_requests_share_a_batch_up_to_its_image_limit():
    pipeline = FakePipeline()
    runner = PipelineRunner("m", pipeline, 8, BatchPolicy(max_batch_size=4, batch_wait_ms=200))
    jobs = [
        FakeJob("a"),
        FakeJob("b", num_images=2),
        FakeJob("other-size", batch_key="1024x1024"),
        FakeJob("c"),
        FakeJob("d"),
    ]
    results = asyncio.run(run_all(runner, jobs))
    runner.close()
    assert results == [f"done {job.name}" for job in jobs]
    assert pipeline.batches == [["a", "b", "c"], ["other-size"], ["d"]]


def test_batching_off_runs_one_request_at_a_time():
    pipeline = FakePipeline()
    runner = PipelineRunner("m", pipeline, 8, BatchPolicy(max_batch_size=1))
    asyncio.run(run_all(runner, [FakeJob("a"), FakeJob("b"), FakeJob("big", num_images=3)]))
    runner.close()
    assert pipeline.batches == [["a"], ["b"], ["big"]]


def test_a_full_queue_refuses_at_once():
    """Batching off and no queue: one request runs, the next is refused (as before)."""
    gate = threading.Event()
    runner = PipelineRunner("m", FakePipeline(gate), 0, BatchPolicy(max_batch_size=1))

    async def scenario() -> None:
        first = asyncio.create_task(runner.run(FakeJob("a")))
        await asyncio.sleep(0.05)
        with pytest.raises(ServerBusy, match="has 1 requests running or waiting"):
            await runner.run(FakeJob("b"))
        gate.set()
        assert await first == "done a"
        assert runner.pending == 0

    asyncio.run(scenario())
    runner.close()


def test_capacity_counts_requests_batch_plus_queue():
    gate = threading.Event()
    runner = PipelineRunner("m", FakePipeline(gate), 1, BatchPolicy(max_batch_size=2))
    assert runner.capacity == 3

    async def scenario() -> list:
        tasks = [asyncio.create_task(runner.run(FakeJob(str(i)))) for i in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(ServerBusy):
            await runner.run(FakeJob("one too many"))
        gate.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(scenario()) == ["done 0", "done 1", "done 2"]
    runner.close()


def test_a_failing_batch_is_retried_one_by_one():
    pipeline = FakePipeline()
    runner = PipelineRunner("m", pipeline, 8, BatchPolicy(max_batch_size=8, batch_wait_ms=100))
    results = asyncio.run(run_all(runner, [FakeJob("a"), FakeJob("bad", fail=True), FakeJob("c")]))
    runner.close()
    assert results[0] == "done a" and results[2] == "done c"
    assert isinstance(results[1], RuntimeError)
    assert pipeline.batches == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]


@pytest.mark.parametrize(
    ("max_batch_size", "names"), [(1, ["a"]), (2, ["a", "b"])], ids=["one", "two"]
)
def test_a_full_batch_runs_without_waiting_out_the_batch_window(max_batch_size, names):
    """The window is for gathering more requests: a batch already full starts at once (with
    batching off, every request would otherwise wait the window)."""
    pipeline = FakePipeline()
    policy = BatchPolicy(max_batch_size=max_batch_size, batch_wait_ms=5000)
    runner = PipelineRunner("m", pipeline, 4, policy)

    async def scenario() -> list:
        return await asyncio.wait_for(run_all(runner, [FakeJob(name) for name in names]), 2)

    assert asyncio.run(scenario()) == [f"done {name}" for name in names]
    runner.close()
    assert pipeline.batches == [names]


def test_a_request_whose_caller_left_is_not_retried_after_its_batch_failed():
    """The one-by-one retries of a failed batch skip a request whose caller has gone."""
    calls: list[list[str]] = []
    retrying = threading.Event()

    def process(jobs: list[FakeJob]) -> list[str]:
        calls.append([job.name for job in jobs])
        if len(jobs) > 1:
            raise RuntimeError("the batch failed")
        if jobs[0].name == "a":
            retrying.set()
            time.sleep(0.3)
        return [f"done {job.name}" for job in jobs]

    runner = PipelineRunner("m", process, 4, BatchPolicy(max_batch_size=3, batch_wait_ms=100))

    async def scenario() -> list:
        requests = [asyncio.create_task(runner.run(FakeJob(name))) for name in "abc"]
        await asyncio.to_thread(retrying.wait, 5)
        requests[2].cancel()
        results = await asyncio.gather(*requests, return_exceptions=True)
        while runner.pending:
            await asyncio.sleep(0.01)
        return results

    first, second, third = asyncio.run(scenario())
    runner.close()
    assert (first, second) == ("done a", "done b")
    assert isinstance(third, asyncio.CancelledError)
    assert calls == [["a", "b", "c"], ["a"], ["b"]]


def test_a_request_cancelled_while_waiting_never_runs():
    gate = threading.Event()
    pipeline = FakePipeline(gate)
    runner = PipelineRunner("m", pipeline, 4, BatchPolicy(max_batch_size=1))

    async def scenario() -> None:
        first = asyncio.create_task(runner.run(FakeJob("a")))
        second = asyncio.create_task(runner.run(FakeJob("cancelled")))
        await asyncio.sleep(0.05)
        second.cancel()
        await asyncio.sleep(0.01)
        gate.set()
        await first
        assert runner.pending == 0

    asyncio.run(scenario())
    runner.close()
    assert pipeline.batches == [["a"]]


def test_a_request_cancelled_while_waiting_takes_no_room_in_a_batch():
    """A cancelled request leaves the queue when cancelled: the next batch is gathered from
    the requests still waiting, not cut short by it."""
    gate = threading.Event()
    pipeline = FakePipeline(gate)
    runner = PipelineRunner("m", pipeline, 8, BatchPolicy(max_batch_size=2, batch_wait_ms=0))

    async def scenario() -> list[str]:
        running = asyncio.create_task(runner.run(FakeJob("running", batch_key="other")))
        await asyncio.sleep(0.05)
        cancelled = asyncio.create_task(runner.run(FakeJob("cancelled")))
        rest = [asyncio.create_task(runner.run(FakeJob(name))) for name in ("b", "c")]
        await asyncio.sleep(0.05)
        cancelled.cancel()
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(running, *rest)

    assert asyncio.run(scenario()) == ["done running", "done b", "done c"]
    runner.close()
    assert pipeline.batches == [["running"], ["b", "c"]]
    assert runner.pending == 0


def test_a_running_batch_stops_once_every_caller_has_left():
    """While one caller of a running batch still waits, the batch goes on; once the last one
    has left too, the next ``stop_if_abandoned`` stops it, and the runner serves on."""
    started = threading.Event()
    steps: list[int] = []

    def process(jobs: list[FakeJob]) -> list[str]:
        started.set()
        for step in range(3 if jobs[0].name == "next" else 500):
            time.sleep(0.01)
            steps.append(step)
            runner.stop_if_abandoned(f"after step {step + 1}")
        return [f"done {job.name}" for job in jobs]

    runner = PipelineRunner("m", process, 4, BatchPolicy(max_batch_size=2, batch_wait_ms=100))

    async def scenario() -> str:
        first = asyncio.create_task(runner.run(FakeJob("a")))
        second = asyncio.create_task(runner.run(FakeJob("b")))
        await asyncio.to_thread(started.wait, 5)
        first.cancel()
        await asyncio.sleep(0.2)
        steps_with_one_caller = len(steps)
        await asyncio.sleep(0.2)
        assert len(steps) > steps_with_one_caller, "the batch stopped while b still waited"
        second.cancel()
        while runner.pending:
            await asyncio.sleep(0.01)
        assert len(steps) < 500, "the batch ran to its end"
        return await asyncio.wait_for(runner.run(FakeJob("next")), 5)

    assert asyncio.run(scenario()) == "done next"
    runner.close()


def test_a_call_runs_on_the_worker_thread_before_waiting_batches():
    """What must run where the batches run (the load-time warm-up: CUDA graphs are recorded
    per thread) goes before requests already waiting, and returns or raises to its caller."""
    gate = threading.Event()
    pipeline = FakePipeline(gate)
    runner = PipelineRunner("m", pipeline, 8, BatchPolicy(max_batch_size=1))
    order: list[str] = []

    def warm_up() -> str:
        order.append(f"call after {len(pipeline.batches)} batches")
        return threading.current_thread().name

    async def until(condition) -> None:
        for _ in range(500):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    async def scenario() -> tuple[list, str]:
        requests = asyncio.gather(*(runner.run(FakeJob(name)) for name in "ab"))
        await until(lambda: runner.pending == 2 and len(runner._waiting) == 1)  # "a" runs
        call = asyncio.create_task(asyncio.to_thread(runner.call, warm_up))
        await until(lambda: len(runner._calls) == 1)
        gate.set()
        return await requests, await call

    results, thread_name = asyncio.run(scenario())
    with pytest.raises(ZeroDivisionError):
        runner.call(lambda: 1 / 0)
    assert runner.call(lambda: "still serving") == "still serving"
    runner.close()
    with pytest.raises(RuntimeError, match="shut down"):  # rather than wait for ever
        runner.call(warm_up)
    assert results == ["done a", "done b"]
    assert thread_name == "pipeline-m"
    assert order == ["call after 1 batches"]  # after the running "a", before the waiting "b"
    assert pipeline.batches == [["a"], ["b"]]


def test_a_wrong_number_of_results_fails_its_batch_and_the_worker_keeps_serving():
    """Results that cannot be handed out one per request fail those requests, not the worker
    thread (which every later request would wait on for ever)."""
    pipeline = FakePipeline()

    def process(jobs: list[FakeJob]) -> list[str]:
        results = pipeline(jobs)
        return [] if jobs[0].name == "lost" else results

    runner = PipelineRunner("m", process, 4, BatchPolicy(max_batch_size=1))

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="0 results for a batch of 1 requests"):
            await asyncio.wait_for(runner.run(FakeJob("lost")), 5)
        assert await asyncio.wait_for(runner.run(FakeJob("next")), 5) == "done next"
        assert runner.pending == 0

    asyncio.run(scenario())
    runner.close()
    assert pipeline.batches == [["lost"], ["next"]]


def test_a_request_after_shutdown_is_refused_rather_than_left_waiting():
    runner = PipelineRunner("m", FakePipeline(), 4, BatchPolicy(max_batch_size=1))
    runner.close()

    async def scenario() -> None:
        with pytest.raises(ServerStopping, match="shutting down") as refused:
            await asyncio.wait_for(runner.run(FakeJob("late")), 5)
        assert isinstance(refused.value, ServerNotReady)  # KServe's 503: retry elsewhere

    asyncio.run(scenario())
    assert runner.pending == 0


def test_a_request_whose_place_was_taken_before_the_shutdown_still_runs():
    """An edit accepted just before SIGTERM, its images still being decoded, is not lost: its
    job runs after ``close``, and the worker ends only once it has (or its place is freed)."""
    pipeline = FakePipeline()
    runner = PipelineRunner("m", pipeline, 4, BatchPolicy(max_batch_size=1))

    async def scenario() -> None:
        with runner.reserve() as slot, runner.reserve():  # the second is never used
            runner.close(grace_seconds=30)
            with pytest.raises(ServerStopping):
                runner.reserve()  # a new request is refused
            assert not runner.join(0.2), "the worker waits for the places being prepared"
            assert (
                await asyncio.wait_for(slot.run(FakeJob("decoded late")), 5) == "done decoded late"
            )
            assert not runner.join(0.2)
        assert runner.join(5)
        assert runner.pending == 0

    asyncio.run(scenario())
    assert pipeline.batches == [["decoded late"]]


def test_a_request_still_prepared_when_the_grace_period_ends_gets_a_clear_503(caplog):
    pipeline = FakePipeline()
    runner = PipelineRunner("m", pipeline, 4, BatchPolicy(max_batch_size=1))

    async def scenario() -> None:
        with runner.reserve() as slot:
            runner.close(grace_seconds=0.1)
            assert runner.join(5), "the grace's end lets the worker go"
            with pytest.raises(ShutdownTimeout, match="Retry later"):
                await slot.run(FakeJob("too late"))
        assert runner.pending == 0

    asyncio.run(scenario())
    assert pipeline.batches == []
    warning = "Model m: 1 requests had not finished 0.1 s into the shutdown"
    deadline = time.monotonic() + 5  # the grace's thread logs it after the worker ends
    while warning not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert warning in caplog.text


def test_a_place_runs_one_job():
    """A second job in one place would be counted by nothing (and leave the count below 0)."""
    runner = PipelineRunner("m", FakePipeline(), 4, BatchPolicy(max_batch_size=1))

    async def scenario() -> None:
        with runner.reserve() as slot:
            assert await slot.run(FakeJob("a")) == "done a"
            with pytest.raises(RuntimeError, match="a place runs one job"):
                await slot.run(FakeJob("b"))
        with pytest.raises(RuntimeError, match="only before it is freed"):
            await slot.run(FakeJob("c"))
        await asyncio.sleep(0.05)
        assert runner.pending == 0

    asyncio.run(scenario())
    runner.close(grace_seconds=None)
    assert runner.join(5)


def test_a_place_is_held_from_its_reservation_until_its_job_ends():
    """``reserve`` takes a place before the job exists (while an edit's images are decoded):
    the capacity counts it, leaving the ``with`` block unused frees it, and once its job is
    queued the job's end does."""
    gate = threading.Event()
    runner = PipelineRunner("m", FakePipeline(gate), 0, BatchPolicy(max_batch_size=1))

    async def scenario() -> None:
        with runner.reserve(), pytest.raises(ServerBusy, match="has 1 requests running"):
            runner.reserve()
        assert runner.pending == 0
        with runner.reserve() as slot:
            running = asyncio.create_task(slot.run(FakeJob("a")))
            await asyncio.sleep(0.05)
        assert runner.pending == 1
        gate.set()
        assert await running == "done a"
        assert runner.pending == 0

    asyncio.run(scenario())
    runner.close()


def test_a_request_cancelled_while_its_job_is_prepared_keeps_its_place_until_that_ends():
    """An edit whose client leaves while its images are decoded: the decoding thread cannot
    be stopped, so the place stays taken until it ends. Freed at once, a client could start
    slow decodes and leave, again and again, past the capacity."""
    decoding = threading.Event()
    decoded = threading.Event()
    runner = PipelineRunner("m", FakePipeline(), 0, BatchPolicy(max_batch_size=1))

    def decode() -> FakeJob:
        decoding.set()
        decoded.wait(5)
        raise ValueError("a broken image, read by nobody")

    async def request() -> str:
        with runner.reserve() as slot:
            return await slot.run(await slot.prepare(decode))

    async def scenario() -> None:
        task = asyncio.create_task(request())
        assert await asyncio.to_thread(decoding.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert runner.pending == 1
        with pytest.raises(ServerBusy):
            runner.reserve()
        decoded.set()
        deadline = time.monotonic() + 5
        while runner.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert runner.pending == 0
        with runner.reserve() as slot:  # the place is free again
            assert await slot.run(await slot.prepare(lambda: FakeJob("next"))) == "done next"

    asyncio.run(scenario())
    runner.close()


def test_a_failed_or_abandoned_request_leaves_nothing_in_reference_cycles():
    """The error handed to a batch's requests held, through its traceback, the frames that
    hold the batch (``_execute``'s, ``_run``'s, ``Slot.prepare``'s): a cycle back to the
    error through the requests' futures, which kept every request (its tensors, its decoded
    images) until the garbage collector's pass."""
    started = threading.Event()

    def process(jobs: list[FakeJob]) -> list[str]:
        if jobs[0].fail:
            raise RuntimeError("bad job")
        started.set()
        for _ in range(500):
            time.sleep(0.01)
            runner.stop_if_abandoned("between steps")
        return [f"done {job.name}" for job in jobs]

    runner = PipelineRunner("m", process, 4, BatchPolicy(max_batch_size=1))

    def unreadable() -> FakeJob:
        raise ValueError("an image that cannot be read")

    async def failing(make_job: Callable[[], FakeJob]) -> None:
        upload = bytes(1_000_000)  # what a request holds while it is served  # noqa: F841
        with runner.reserve() as slot:
            await slot.run(await slot.prepare(make_job))

    async def refusal(make_job: Callable[[], FakeJob]) -> str:
        # Not pytest.raises: its record of the error would hold the frames itself.
        try:
            await failing(make_job)
        except (RuntimeError, ValueError) as error:
            return str(error)
        return "served"

    async def scenario() -> list[str]:
        refusals = [
            await refusal(lambda: FakeJob("failed", fail=True)),
            await refusal(unreadable),
        ]
        abandoned = asyncio.create_task(failing(lambda: FakeJob("abandoned")))
        await asyncio.to_thread(started.wait, 5)
        abandoned.cancel()
        await asyncio.wait([abandoned])
        while runner.pending:
            await asyncio.sleep(0.01)
        return refusals

    with collector_off():
        assert asyncio.run(scenario()) == ["bad job", "an image that cannot be read"]
        garbage = cyclic_garbage()
        assert [job for job in garbage if isinstance(job, FakeJob)] == []
        assert frames_holding(garbage, 1_000_000) == []
    runner.close()


@pytest.mark.parametrize("wait_ms", [math.nan, math.inf, -1, 10_001])
def test_a_batch_wait_that_is_not_a_sane_number_of_milliseconds_is_refused(wait_ms):
    with pytest.raises(ValueError, match="batch_wait_ms must be a number of milliseconds"):
        BatchPolicy(max_batch_size=2, batch_wait_ms=wait_ms)


def test_an_unexpected_error_in_the_worker_fails_every_request_rather_than_hang(monkeypatch):
    """Outside a batch (here while one is gathered) nothing hands an error to the requests:
    the worker thread ended and every request waited for ever. Now each fails, later ones at
    once, with a 503 that says why."""
    runner = PipelineRunner("m", FakePipeline(), 4, BatchPolicy(max_batch_size=2))

    def select():
        raise RuntimeError("the worker broke")

    monkeypatch.setattr(runner, "_select", select)

    async def scenario() -> None:
        for name in ("waiting", "later"):
            with pytest.raises(ServerNotReady, match=r"\(RuntimeError: the worker broke\)"):
                await asyncio.wait_for(runner.run(FakeJob(name)), 5)
        assert runner.pending == 0

    asyncio.run(scenario())
    assert runner.failure is not None


def test_closing_returns_at_once_and_the_grace_period_bounds_the_wait():
    """``close`` runs on the event loop (KServe's shutdown): it must not wait for the work.
    Accepted requests go on; those unfinished when the grace period ends fail with a clear
    503, their batch is told to stop, and the worker thread then ends."""
    gate = threading.Event()
    pipeline = FakePipeline(gate)
    runner = PipelineRunner("m", pipeline, 4, BatchPolicy(max_batch_size=1))

    async def scenario() -> list:
        requests = [asyncio.create_task(runner.run(FakeJob(name))) for name in "ab"]
        await asyncio.sleep(0.05)  # "a" runs (held at the gate), "b" waits
        started = time.monotonic()
        runner.close(grace_seconds=0.5)
        assert time.monotonic() - started < 0.05
        with pytest.raises(ServerStopping):
            await runner.run(FakeJob("late"))
        results = await asyncio.gather(*requests, return_exceptions=True)
        assert 0.4 < time.monotonic() - started < 2
        return results

    results = asyncio.run(scenario())
    for result in results:
        assert isinstance(result, ServerNotReady)
        assert "did not finish this request in the 0.5 s a shutdown leaves" in str(result)
    gate.set()
    assert runner.join(5)
    assert pipeline.batches == [["a"]]  # "b" never ran


def test_requests_that_finish_within_the_grace_period_succeed():
    runner = PipelineRunner("m", FakePipeline(), 4, BatchPolicy(max_batch_size=1))

    async def scenario() -> list[str]:
        requests = [asyncio.create_task(runner.run(FakeJob(name))) for name in "abc"]
        await asyncio.sleep(0)
        runner.close(grace_seconds=5)
        return await asyncio.gather(*requests)

    assert asyncio.run(scenario()) == ["done a", "done b", "done c"]
    assert runner.join(5)


def test_the_grace_period_also_ends_the_one_by_one_retries_of_a_failed_batch():
    """A failed batch's requests wait for their retry outside the queue: when the grace
    period ends during the first retry, the later ones fail with the 503 too, and never run."""
    calls: list[list[str]] = []

    def process(jobs: list[FakeJob]) -> list[str]:
        calls.append([job.name for job in jobs])
        if len(jobs) > 1:
            raise RuntimeError("the batch failed")
        time.sleep(1)  # the first retry outlasts the grace period
        return [f"done {job.name}" for job in jobs]

    runner = PipelineRunner("m", process, 4, BatchPolicy(max_batch_size=3, batch_wait_ms=100))

    async def scenario() -> list:
        requests = [asyncio.create_task(runner.run(FakeJob(name))) for name in "abc"]
        await asyncio.sleep(0.3)  # the batch failed; "a" is being retried
        started = time.monotonic()
        runner.close(grace_seconds=0.2)
        results = await asyncio.gather(*requests, return_exceptions=True)
        assert time.monotonic() - started < 0.8
        return results

    for result in asyncio.run(scenario()):
        assert isinstance(result, ServerNotReady), result
        assert "did not finish this request" in str(result)
    assert runner.join(5)
    assert calls == [["a", "b", "c"], ["a"]]


def test_a_base_exception_in_a_batch_fails_its_requests_rather_than_hang():
    def process(jobs: list[FakeJob]) -> list[str]:
        raise SystemExit("a library gave up")

    runner = PipelineRunner("m", process, 4, BatchPolicy(max_batch_size=2, batch_wait_ms=50))

    async def scenario() -> list:
        requests = [runner.run(FakeJob(name)) for name in "ab"]
        return await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), 5)

    for result in asyncio.run(scenario()):
        assert isinstance(result, ServerNotReady), result
        assert "SystemExit: a library gave up" in str(result)
    assert runner.join(5)


def test_a_request_that_ends_after_its_event_loop_logs_no_error(caplog):
    """After the servers stop, the process waits for the worker's last batch: its requests'
    end then finds the event loop closed, which is no error."""
    gate = threading.Event()
    runner = PipelineRunner("m", FakePipeline(gate), 4, BatchPolicy(max_batch_size=1))

    async def scenario() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(runner.run(FakeJob("a")), 0.2)

    asyncio.run(scenario())
    gate.set()
    runner.close()
    assert runner.join(5)
    assert "exception calling callback" not in caplog.text
    assert "Event loop is closed" not in caplog.text


class Activations:
    """Stands for the tensors in a pipeline's frames (weakly referenceable)."""


def test_a_failed_batch_frees_its_memory_before_the_one_by_one_retries():
    """A batch too big for the GPU fails with tensors in its frames, which its exception's
    traceback holds: they are freed before its requests run again alone, and a failed
    request's once its caller drops the error."""
    failed: list[weakref.ref] = []
    alive_in_retries: list[bool] = []

    def process(jobs: list[FakeJob]) -> list[str]:
        activations = Activations()
        if len(jobs) > 1 or jobs[0].fail:
            failed.append(weakref.ref(activations))
            raise RuntimeError("CUDA out of memory")
        alive_in_retries.append(failed[0]() is not None)
        return [f"done {job.name}" for job in jobs]

    runner = PipelineRunner("m", process, 8, BatchPolicy(max_batch_size=4, batch_wait_ms=100))
    gc.disable()
    try:
        results = asyncio.run(run_all(runner, [FakeJob("a"), FakeJob("b")]))
    finally:
        gc.enable()
    assert results == ["done a", "done b"]
    assert alive_in_retries == [False, False]

    async def fail_alone() -> None:
        with pytest.raises(RuntimeError, match="out of memory"):
            await runner.run(FakeJob("bad", fail=True))

    gc.disable()  # freed by reference counting, not by the collector's next pass
    try:
        asyncio.run(fail_alone())
        deadline = time.monotonic() + 2  # the worker drops the batch just after settling it
        while failed[1]() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        gc.enable()
    assert failed[1]() is None, "the last failed batch's memory is kept"
    runner.close()
