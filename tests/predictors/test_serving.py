"""Serving behaviour: loading errors, responsiveness during generation, backpressure."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from fastapi import FastAPI, Request
from kserve import InferenceGRPCClient, InferInput, InferRequest, InferResponse
from kserve.errors import InvalidInput, ServerNotReady, generic_exception_handler
from PIL import Image
from prometheus_client import REGISTRY

from predictors import contract
from predictors import model as model_module
from predictors.engine import ServerBusy
from predictors.generation import QwenImageGenerationModel
from predictors.model import PredictorOptions
from predictors.server import AnswerUnexpectedErrors
from tests.servers import (
    PROJECT_ROOT,
    RunningPredictor,
    run_predictor,
    uvicorn_server,
    wait_for_queue_depth,
)

# Slow enough on the tiny CPU pipeline (several seconds) to overlap with other calls.
SLOW = {"width": 1024, "height": 1024, "num_inference_steps": 6}


def run_to_exit(
    *args: str, env: dict[str, str], module: str = "predictors.generation"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_location_is_a_clear_error_not_a_traceback(tmp_path):
    missing = tmp_path / "no-such-model"
    result = run_to_exit(env={"QWEN_IMAGE_LOCATION": str(missing)})
    assert result.returncode == 2
    assert f"model location '{missing}' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_directory_without_a_pipeline_is_a_clear_error(tmp_path):
    result = run_to_exit(f"--qwen_image_location={tmp_path}", env={})
    assert result.returncode == 2
    assert f"{tmp_path} is not a diffusers pipeline directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_hub_repo_is_a_clear_error(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = run_to_exit("--qwen_image_location=Qwen/Qwen-Image", env=env)
    assert result.returncode == 2
    assert "cannot read 'Qwen/Qwen-Image'/model_index.json: " in result.stderr
    assert "cannot find the requested files in the local cache" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--device=cuda:7", "device 'cuda:7' is not available: this machine has"),
        ("--device=tpu", "unknown device 'tpu': use auto, cpu, cuda or cuda:N"),
        ("--dtype=int4", "unknown dtype 'int4': use auto or one of bfloat16, float16, float32"),
        ("--max_queue_size=-1", "argument --max_queue_size: must be 0 or more, not -1"),
        ("--min_size=4096", "the least size (4096) is above the most (2048)"),
        ("--max_steps=1", "the least steps (2) is above the most (1)"),
        ("--workers=2", "--workers must be 1, not 2: one process holds the pipeline"),
        ("--warmup_sizes=1000x1000", "widths and heights are positive multiples of 16"),
        # NaN made every request wait for ever, infinity stopped the worker thread.
        ("--batch_wait_ms=nan", "batch_wait_ms must be a number of milliseconds from 0 to"),
        ("--batch_wait_ms=inf", "batch_wait_ms must be a number of milliseconds from 0 to"),
        # Limits that refuse the request defaults would refuse every request that omits them.
        (
            "--max_size=1024",
            "qwen-image's default size, 1664x928, is outside --min_size 256 .. --max_size 1024",
        ),
        ("--max_steps=30", "qwen-image's default steps (50) is outside 2 .. --max_steps 30"),
        (
            "--max_size=1024 --default_size=1280x720",
            "qwen-image's default size, 1280x720, is outside --min_size 256 .. --max_size 1024",
        ),
        ("--default_size=1024", "invalid sizes '1024': use auto, none or WxH"),
        ("--default_size=512x512,256x256", "invalid size '512x512,256x256': use auto or WxH"),
        (
            "--lora=lightning.safetensors --lora_steps=120",
            "--lora_steps (120) is outside 2 .. --max_steps 100",
        ),
    ],
)
def test_an_unusable_setting_is_a_clear_error(tiny_cache_env, flags, message):
    result = run_to_exit(*flags.split(), env=tiny_cache_env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_the_edit_predictor_has_no_default_size_to_set(tiny_cache_env):
    result = run_to_exit("--default_size=1024x1024", env=tiny_cache_env, module="predictors.edit")
    assert result.returncode == 2
    assert "--default_size is for text-to-image" in result.stderr


def test_a_deployment_sets_the_size_of_requests_that_name_none(tiny_cache_env, log_dir):
    """--default_size lets a deployment cap sizes below the original service's default."""
    flags = ("--max_size=512", "--default_size=384x256")
    with run_predictor(
        "predictors.generation", "qwen-image", log_dir, *flags, env=tiny_cache_env
    ) as predictor:
        body = contract.build_rest_body("a red cube", num_inference_steps=2)
        response = httpx.post(predictor.infer_url, json=body, timeout=120)
        assert response.status_code == 200, response.text
        (result,) = contract.parse_rest_response(response.json())
        assert Image.open(io.BytesIO(result.data)).size == (384, 256)


def test_health_is_fast_and_a_full_queue_says_busy(tiny_cache_env, log_dir):
    """With no queue, a second request during a generation is refused with 503 at once,
    while liveness and readiness still answer within 200 ms (the fastest of three probes)."""
    with run_predictor(
        "predictors.generation", "qwen-image", log_dir, "--max_queue_size=0", env=tiny_cache_env
    ) as predictor:
        slow_result: dict[str, httpx.Response] = {}

        def slow_request() -> None:
            body = contract.build_rest_body("a slow one", **SLOW)
            slow_result["response"] = httpx.post(predictor.infer_url, json=body, timeout=120)

        worker = threading.Thread(target=slow_request)
        worker.start()
        wait_for_queue_depth(predictor, 1, timeout=10)

        # The fastest of three probes: an event loop that the generation blocked would make
        # all three slow; another process taking a core on a small CI machine, only one.
        for path in ("/v2/health/live", "/v2/models/qwen-image/ready"):
            timings = []
            for _ in range(3):
                started = time.perf_counter()
                response = httpx.get(predictor.url + path, timeout=5)
                timings.append(time.perf_counter() - started)
                assert response.status_code == 200
            elapsed = min(timings)
            assert elapsed < 0.2, f"{path} took {[f'{t * 1000:.0f} ms' for t in timings]}"

        body = contract.build_rest_body("one too many", width=256, height=256)
        started = time.perf_counter()
        busy = httpx.post(predictor.infer_url, json=body, timeout=30)
        assert busy.status_code == 503
        assert "Server is busy" in busy.json()["error"]
        assert time.perf_counter() - started < 1

        with pytest.raises(grpc.aio.AioRpcError) as grpc_busy:
            asyncio.run(grpc_infer(predictor.grpc_port, "one too many over gRPC"))
        assert grpc_busy.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Server is busy" in grpc_busy.value.details()
        assert worker.is_alive(), "the slow request should still be running"
        log = predictor.log()
        assert "model=qwen-image outcome=busy" in log
        assert "ServerBusy" not in log, "a shed request logged a traceback"

        worker.join()
        assert slow_result["response"].status_code == 200
        metrics = httpx.get(f"{predictor.url}/metrics").text
        busy_count = re.search(
            r'^qwen_image_requests_rejected_total\{model_name="qwen-image",reason="busy"\} (\S+)$',
            metrics,
            re.MULTILINE,
        )
        # One REST refusal, and at least one over gRPC (KServe's gRPC client retries UNAVAILABLE).
        assert busy_count and float(busy_count.group(1)) >= 2


async def grpc_infer(
    port: int, prompt: str, timeout: float = 60, request_id: str | None = None
) -> InferResponse:
    client = InferenceGRPCClient(f"127.0.0.1:{port}", timeout=timeout)
    try:
        parameters = contract.build_parameters(width=256, height=256, for_grpc=True)
        request = InferRequest(
            model_name="qwen-image",
            infer_inputs=[InferInput(contract.PROMPT, [1], "BYTES", [prompt])],
            parameters=parameters,
            request_id=request_id,
        )
        return await client.infer(request)
    finally:
        await client.close()


def prompt_request(prompt: str, request_id: str | None = None, **parameters) -> InferRequest:
    """A v2 request of ``prompt`` at 256x256 unless ``parameters`` say otherwise."""
    return InferRequest(
        model_name="m",
        infer_inputs=[InferInput(contract.PROMPT, [1], "BYTES", [prompt])],
        request_id=request_id,
        parameters={"width": 256, "height": 256, **parameters},
    )


def test_an_encoding_failure_is_logged_and_counted_like_other_errors(monkeypatch, caplog):
    """A request that fails while its images are encoded gets its log line (with its id) and
    its error latency sample, as a failure in the pipeline does."""
    model = QwenImageGenerationModel("encode-fails", PredictorOptions(device="cpu"))
    model.runner.process = lambda jobs: [[Image.new("RGB", (256, 256))] for _ in jobs]
    model.ready = True

    def encode_image(*args) -> bytes:
        raise OSError("encoder unavailable")

    monkeypatch.setattr(model_module, "encode_image", encode_image)
    request = prompt_request("a cat", request_id="req-encode-789")
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(OSError, match="encoder"):
            asyncio.run(model.predict(request))
    finally:
        model.stop()
    assert "request_id=req-encode-789 model=encode-fails outcome=error" in caplog.text
    errors = REGISTRY.get_sample_value(
        "qwen_image_request_duration_seconds_count",
        {"model_name": "encode-fails", "outcome": "error"},
    )
    assert errors == 1


def test_requests_past_the_capacity_are_refused_before_their_preparation():
    """A request takes its place before its preparation (decoding edit images, here a
    sleep): of ten at once with room for one, one is prepared and runs, nine are refused at
    once. A place whose preparation fails is freed, and one whose request is cancelled meanwhile
    once the preparation's thread has ended."""
    model = QwenImageGenerationModel("capacity", PredictorOptions(device="cpu", max_queue_size=0))
    model.runner.process = lambda jobs: [[Image.new("RGB", (256, 256))] for _ in jobs]
    model.ready = True
    prepared: list[str] = []
    job = model.prepare

    def prepare(request: contract.ImageRequest):
        prepared.append(request.prompt)
        time.sleep(0.3)
        if request.prompt == "bad":
            raise contract.ContractError(contract.PROMPT, "'prompt' is bad")
        return job(request)

    model.prepare = prepare

    async def scenario() -> None:
        results = await asyncio.gather(
            *(model.predict(prompt_request(f"p{n}")) for n in range(10)), return_exceptions=True
        )
        busy = [result for result in results if isinstance(result, ServerBusy)]
        assert (len(prepared), len(busy)) == (1, 9), results
        assert model.runner.pending == 0
        with pytest.raises(InvalidInput):
            await model.predict(prompt_request("bad"))
        assert model.runner.pending == 0
        cancelled = asyncio.create_task(model.predict(prompt_request("cancelled")))
        await asyncio.sleep(0.1)  # in its preparation
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert model.runner.pending == 1, "held until its preparation's thread ends"
        await asyncio.sleep(0.5)
        assert model.runner.pending == 0
        await model.predict(prompt_request("room again"))

    try:
        asyncio.run(scenario())
    finally:
        model.stop()


def test_a_worker_that_stops_fails_requests_and_the_model_is_no_longer_ready(monkeypatch):
    """An error outside a batch's own ends the worker thread: the waiting request fails with
    a 503 that says so instead of waiting for ever, later ones too, and the model reports not
    ready (KServe's readiness, and its load() before an infer call, get the same error)."""
    model = QwenImageGenerationModel("broken", PredictorOptions(device="cpu"))
    model.ready = True

    def select():
        raise RuntimeError("the worker broke")

    monkeypatch.setattr(model.runner, "_select", select)

    async def scenario() -> None:
        for prompt in ("waiting when it broke", "after"):
            with pytest.raises(ServerNotReady, match=r"worker stopped .*RuntimeError: the worker"):
                await asyncio.wait_for(model.predict(prompt_request(prompt)), 10)
        assert not await model.healthy()

    asyncio.run(scenario())
    with pytest.raises(ServerNotReady, match="Restart the predictor"):
        model.load()


@contextlib.contextmanager
def slow_request_running(predictor: RunningPredictor) -> Iterator[concurrent.futures.Future]:
    """A slow request runs during the block (nothing else queued), as the future of its
    answer; it succeeds afterwards, and no batch was stopped meanwhile."""
    slow = contract.build_rest_body("running", **SLOW)
    stopped_before = predictor.log().count("Stopped a batch")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, predictor.infer_url, json=slow, timeout=120)
        wait_for_queue_depth(predictor, 1, timeout=10)
        yield running
        assert running.result().status_code == 200
    assert predictor.log().count("Stopped a batch") == stopped_before, "a batch was stopped"


def send_without_reading(client: socket.socket, body: dict) -> None:
    """Send a v2 infer request over ``client`` and leave its answer unread, as a client that
    is about to give up."""
    data = json.dumps(body).encode()
    client.sendall(
        b"POST /v2/models/qwen-image/infer HTTP/1.1\r\nhost: predictor\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data)
    )


def assert_cancelled_before_running(predictor: RunningPredictor, request_id: str) -> None:
    """The request was cancelled and never ran: it left the queue while the one slow request
    ran (``slow_request_running`` checks that none of its batches was stopped)."""
    log = predictor.log()
    assert f"request_id={request_id} model=qwen-image outcome=cancelled" in log, log[-2000:]
    assert f"request_id={request_id} model=qwen-image size=" not in log, f"{request_id} ran"


def test_a_request_whose_client_leaves_while_queued_never_runs(generation_predictor):
    """A REST client that disconnects while its request waits behind a running one takes
    the request out of the queue (``predictors.disconnect``): it is logged as cancelled,
    never runs, and the running one finishes."""
    predictor = generation_predictor
    left = contract.build_rest_body("given up", request_id="given-up", width=64, height=64)
    with slow_request_running(predictor) as running:
        with socket.create_connection(("127.0.0.1", predictor.http_port)) as client:
            send_without_reading(client, left)
            wait_for_queue_depth(predictor, 2, timeout=10)
        wait_for_queue_depth(predictor, 1, timeout=5)
        assert not running.done(), "the queue shrank while the slow request still ran"
    assert_cancelled_before_running(predictor, "given-up")


def test_a_grpc_call_past_its_deadline_leaves_the_queue(generation_predictor):
    """gRPC cancels the handler of a call whose deadline passed (or whose client cancelled
    it): a waiting request leaves the queue as with REST."""
    predictor = generation_predictor
    with slow_request_running(predictor) as running:
        with pytest.raises(grpc.aio.AioRpcError) as late:
            asyncio.run(
                grpc_infer(predictor.grpc_port, "given up", timeout=1, request_id="grpc-late")
            )
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for_queue_depth(predictor, 1, timeout=5)
        assert not running.done(), "the queue shrank while the slow request still ran"
    assert_cancelled_before_running(predictor, "grpc-late")


def test_a_running_request_whose_client_leaves_stops_between_steps(generation_predictor):
    """Once every client of the running batch has left, the batch stops at its next step
    and frees the worker, instead of denoising images nobody will receive."""
    predictor = generation_predictor
    steps = 100  # the most allowed: over ten seconds on the tiny CPU pipeline
    body = contract.build_rest_body(
        "abandoned", request_id="abandoned", width=1024, height=1024, num_inference_steps=steps
    )
    with socket.create_connection(("127.0.0.1", predictor.http_port)) as client:
        send_without_reading(client, body)
        wait_for_queue_depth(predictor, 1, timeout=10)
        time.sleep(1)  # into its steps
    wait_for_queue_depth(predictor, 0, timeout=10)
    log = predictor.log()
    stopped = re.search(rf"every caller of a batch of 1 left; after step (\d+)/{steps}", log)
    assert stopped and int(stopped[1]) < steps, log[-2000:]
    assert "request_id=abandoned model=qwen-image outcome=cancelled" in log


def test_a_request_id_cannot_forge_log_lines(caplog):
    """A v2 body's id is the client's text: its line-breaking characters are escaped in the
    log, so a newline cannot start a line of its own."""
    model = QwenImageGenerationModel("forged-ids", PredictorOptions(device="cpu"))
    model.ready = True
    forged = "real\nrequest_id=forged model=forged-ids outcome=ok\r\x1b[2K\u2028"
    request = prompt_request("a cat", request_id=forged, width=100)
    try:
        with caplog.at_level(logging.INFO), pytest.raises(InvalidInput):
            asyncio.run(model.predict(request))
    finally:
        model.stop()
    escaped = "real\\nrequest_id=forged model=forged-ids outcome=ok\\r\\x1b[2K\\u2028"
    assert f"request_id={escaped} model=forged-ids outcome=invalid" in caplog.text
    assert not any(line.startswith("request_id=forged") for line in caplog.messages)
    assert all(len(message.splitlines()) == 1 for message in caplog.messages)


def test_an_unexpected_error_gets_kserves_500_and_keeps_the_connection(caplog):
    """KServe's REST app answers an unexpected error (a failed inference) from Starlette's
    outermost middleware, which then raised it again: uvicorn logged it a second time and
    closed the connection, so the adapter's next call on it could fail."""
    app = FastAPI()
    app.add_exception_handler(Exception, generic_exception_handler)  # as KServe's app does
    app.add_middleware(AnswerUnexpectedErrors)

    @app.get("/port")
    async def port(request: Request) -> dict[str, int]:
        return {"port": request.client.port}

    @app.get("/fail")
    async def fail() -> None:
        raise RuntimeError("CUDA error: out of memory")

    with (
        caplog.at_level(logging.ERROR),
        uvicorn_server(app) as url,
        httpx.Client(base_url=url) as client,
    ):
        first_port = client.get("/port").json()["port"]
        failed = client.get("/fail")
        assert failed.status_code == 500
        assert failed.json() == {"error": "RuntimeError : CUDA error: out of memory"}
        assert client.get("/port").json()["port"] == first_port, "the same connection"
    assert "Exception in ASGI application" not in caplog.text
    logged = [record for record in caplog.records if record.exc_info]
    assert [record.name for record in logged] == ["kserve"]  # its handler's record, once
