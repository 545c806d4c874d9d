"""Stopping a predictor: the requests it accepted finish first, within the grace period."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import socket
import threading
import time

import grpc
import httpx
from kserve import InferenceGRPCClient, InferInput, InferRequest

from predictors import contract
from tests.servers import (
    RunningPredictor,
    run_predictor,
    server_sent_events,
    wait_for_queue_depth,
)

# A request of several seconds on the tiny CPU pipeline, to be in flight at SIGTERM.
SLOW = {"width": 1024, "height": 1024, "num_inference_steps": 8}
SLOWER = {**SLOW, "num_inference_steps": 24}  # still running well after the signal
FAST = {"num_inference_steps": 2}


def answer_after_sigterm(tiny_cache_env: dict[str, str], log_dir, grace_seconds: int) -> int:
    """Start a predictor, send it a slow request, SIGTERM it once the request runs; the
    request's HTTP status (0: no answer) after the process exits."""
    env = {**tiny_cache_env, "QWEN_SHUTDOWN_GRACE_SECONDS": str(grace_seconds)}
    with run_predictor("predictors.generation", "qwen-image", log_dir, env=env) as predictor:
        answer: dict[str, int] = {}

        def slow_request() -> None:
            body = contract.build_rest_body("in flight at SIGTERM", **SLOW)
            try:
                answer["status"] = httpx.post(
                    predictor.infer_url, json=body, timeout=120
                ).status_code
            except httpx.HTTPError:
                answer["status"] = 0

        client = threading.Thread(target=slow_request)
        client.start()
        wait_for_queue_depth(predictor, 1)
        predictor.process.send_signal(signal.SIGTERM)
        client.join(timeout=120)
        assert predictor.process.wait(timeout=120) == 0
    return answer["status"]


def test_sigterm_lets_an_accepted_request_finish(tiny_cache_env, log_dir):
    assert answer_after_sigterm(tiny_cache_env, log_dir, grace_seconds=120) == 200


def test_the_grace_period_bounds_the_wait(tiny_cache_env, log_dir):
    """KServe's server cancels what is left after the grace period (its default is 30 s,
    shorter than a queue of large images: hence the predictor's own, longer default)."""
    assert answer_after_sigterm(tiny_cache_env, log_dir, grace_seconds=1) != 200


def grpc_infer(predictor: RunningPredictor, prompt: str, **fields) -> str:
    """A gRPC infer call without the client's retries: ``OK``, or the status code and
    details of its error."""

    async def call() -> str:
        client = InferenceGRPCClient(f"127.0.0.1:{predictor.grpc_port}", retries=0, timeout=120)
        request = InferRequest(
            model_name=predictor.model_name,
            infer_inputs=[InferInput(contract.PROMPT, [1], "BYTES", [prompt])],
            parameters=contract.build_parameters(for_grpc=True, **fields),
        )
        try:
            await client.infer(request)
            return "OK"
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name} {exc.details()}"
        finally:
            await client.close()

    return asyncio.run(call())


def test_grpc_takes_no_new_call_from_sigterm_while_rest_drains(tiny_cache_env, log_dir):
    """Both protocols stop taking work at the signal: a gRPC call made while an accepted
    REST request still runs is refused at once (it used to be accepted, and answered after
    REST's drain), and the REST request finishes."""
    env = {**tiny_cache_env, "QWEN_SHUTDOWN_GRACE_SECONDS": "120"}
    with run_predictor("predictors.generation", "qwen-image", log_dir, env=env) as predictor:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            body = contract.build_rest_body("in flight at SIGTERM", **SLOWER)
            running = pool.submit(httpx.post, predictor.infer_url, json=body, timeout=120)
            wait_for_queue_depth(predictor, 1)
            predictor.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            started = time.monotonic()
            late = grpc_infer(predictor, "after SIGTERM", width=256, height=256, **FAST)
            assert late.startswith("UNAVAILABLE"), late
            assert time.monotonic() - started < 2
            assert not running.done(), "the REST request should still run"
            assert running.result().status_code == 200
        assert predictor.process.wait(timeout=60) == 0


def test_requests_unfinished_when_the_grace_period_ends_get_a_clear_503(tiny_cache_env, log_dir):
    """Over both protocols, what is still running or queued in the grace period's last second
    is answered with a 503 that says so (it used to run to its end, past the grace period,
    or to be cut without an answer), and the process exits within the grace period."""
    env = {**tiny_cache_env, "QWEN_SHUTDOWN_GRACE_SECONDS": "3"}
    with run_predictor("predictors.generation", "qwen-image", log_dir, env=env) as predictor:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            body = contract.build_rest_body("running at SIGTERM", **SLOWER)
            rest = pool.submit(httpx.post, predictor.infer_url, json=body, timeout=120)
            wait_for_queue_depth(predictor, 1)
            queued = pool.submit(grpc_infer, predictor, "queued at SIGTERM", **SLOW)
            wait_for_queue_depth(predictor, 2)
            predictor.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            message = "did not finish this request in the 2 s a shutdown leaves requests"
            assert rest.result().status_code == 503
            assert message in rest.result().json()["error"]
            assert queued.result().startswith("UNAVAILABLE"), queued.result()
            assert message in queued.result()
        assert predictor.process.wait(timeout=60) == 0
        assert time.monotonic() - signalled < 5  # the grace period, and the last step
        log = predictor.log()  # a shutdown's doing, not an error of the predictor's
        assert log.count(" outcome=stopped ") == 2 and " outcome=error " not in log, log


def test_a_stream_unfinished_when_the_grace_period_ends_ends_with_an_error_event(
    tiny_cache_env, log_dir
):
    """A streamed request that has sent its first preview cannot get a 503 status any more:
    its stream ends with an ``error`` event carrying the 503 and its message."""
    env = {**tiny_cache_env, "QWEN_SHUTDOWN_GRACE_SECONDS": "3"}
    with run_predictor("predictors.generation", "qwen-image", log_dir, env=env) as predictor:
        body = contract.build_rest_body("streamed at SIGTERM", partial_images=3, **SLOWER)
        with httpx.stream("POST", predictor.stream_url, json=body, timeout=120) as response:
            assert response.status_code == 200
            events = server_sent_events(response)
            assert next(events)[0] == "partial_image"
            predictor.process.send_signal(signal.SIGTERM)
            *_, (name, data) = events
        assert name == "error"
        assert data["status"] == 503
        assert "did not finish this request in the 2 s a shutdown leaves" in data["error"]
        assert predictor.process.wait(timeout=60) == 0


def test_a_connection_still_uploading_does_not_outlast_the_grace_period(tiny_cache_env, log_dir):
    """A client still sending its body at SIGTERM has no request in the queue: the server's
    own grace period (uvicorn's) must bound the wait for it, so that the pod exits within
    its grace period instead of being killed."""
    env = {**tiny_cache_env, "QWEN_SHUTDOWN_GRACE_SECONDS": "2"}
    with (
        run_predictor("predictors.generation", "qwen-image", log_dir, env=env) as predictor,
        socket.create_connection(("127.0.0.1", predictor.http_port)) as client,
    ):
        client.sendall(
            b"POST /v2/models/qwen-image/infer HTTP/1.1\r\nhost: predictor\r\n"
            b"content-type: application/json\r\ncontent-length: 100000\r\n\r\n{"
        )
        time.sleep(0.5)  # the server holds the connection, waiting for the rest
        predictor.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        predictor.process.wait(timeout=60)
        assert time.monotonic() - signalled < 10
