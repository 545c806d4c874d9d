"""``infer_stream``: a v2 infer call answered with server-sent events, previews first."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import re

import httpx
import numpy as np
import pytest
from kserve import InferInput, InferRequest, InferResponse
from PIL import Image

from predictors import contract
from predictors.denoise import Job
from predictors.disconnect import CancelOnDisconnect, EventStreamResponse
from predictors.engine import BatchPolicy
from predictors.generation import QwenImageGenerationModel
from predictors.model import PredictorOptions
from tests.cycles import collector_off, cyclic_garbage, frames_holding
from tests.servers import RunningPredictor, server_sent_events, wait_for_queue_depth


def stream(predictor: RunningPredictor, prompt: str, **fields) -> httpx.Response:
    body = contract.build_rest_body(prompt, **fields)
    return httpx.post(predictor.stream_url, json=body, timeout=120)


def events_of(response: httpx.Response) -> list[tuple[str, dict]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return list(server_sent_events(response))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_previews_of_each_image_come_first_then_infers_answer(generation_predictor):
    """Two images, two previews each, after steps 2 and 4 of 6: numbered per image, with
    the image's seed, encoded as asked; then the answer ``/infer`` gives the same request,
    whose images the previews did not change. Binary outputs, which a line of text cannot
    carry, are not used."""
    fields = dict(width=96, height=64, num_inference_steps=6, num_images=2, seed=7)
    fields |= dict(output_format="jpeg", output_compression=95)
    response = stream(
        generation_predictor, "a lighthouse", partial_images=2, binary_output=True, **fields
    )
    events = events_of(response)
    assert [name for name, _ in events] == ["partial_image"] * 4 + ["completed"]
    previews = [contract.parse_partial_image(data) for _, data in events[:-1]]
    assert [(p.image_index, p.partial_image_index, p.seed) for p in previews] == [
        (0, 0, 7),
        (1, 0, 8),
        (0, 1, 7),
        (1, 1, 8),
    ]
    for preview in previews:
        image = Image.open(io.BytesIO(preview.data))
        assert (image.format, image.size) == ("JPEG", (96, 64))
    streamed = contract.parse_rest_response(events[-1][1])
    plain = httpx.post(
        generation_predictor.infer_url,
        json=contract.build_rest_body("a lighthouse", **fields),
        timeout=120,
    )
    assert plain.status_code == 200, plain.text
    expected = contract.parse_rest_response(plain.json())
    assert [r.seed for r in streamed] == [r.seed for r in expected] == [7, 8]
    for got, want in zip(streamed, expected, strict=True):
        assert np.array_equal(pixels(got.data), pixels(want.data))
    assert not np.array_equal(pixels(previews[2].data), pixels(streamed[0].data))


def test_no_previews_asked_is_the_answer_alone(generation_predictor):
    response = stream(generation_predictor, "a cat", width=64, height=64, num_inference_steps=2)
    ((name, data),) = events_of(response)
    assert name == "completed"
    assert len(contract.parse_rest_response(data)) == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"width": 8, "height": 64}, "'width' must be a multiple of 16"),
        ({"partial_images": 4}, "'partial_images' must be between 0 and 3"),
    ],
)
def test_a_refused_stream_gets_infers_status_and_body(generation_predictor, fields, message):
    """A request refused before its run gets the 400 ``/infer`` gives, not a stream."""
    response = stream(generation_predictor, "a cat", **fields)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_a_malformed_body_is_a_400(generation_predictor):
    response = httpx.post(generation_predictor.stream_url, content=b"{not json", timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error.startswith("The body is not a v2 inference request: Invalid JSON")


def test_a_stream_whose_client_leaves_stops_its_batch(generation_predictor):
    """A client that reads its first preview and closes the connection gives the request
    up: its batch stops at the next step, as when a client of ``/infer`` leaves."""
    predictor = generation_predictor
    steps = 100  # over ten seconds on the tiny CPU pipeline
    body = contract.build_rest_body(
        "left after a preview",
        request_id="left-stream",
        width=1024,
        height=1024,
        num_inference_steps=steps,
        partial_images=3,
    )
    with httpx.stream("POST", predictor.stream_url, json=body, timeout=120) as response:
        name, _ = next(server_sent_events(response))
        assert name == "partial_image"
    wait_for_queue_depth(predictor, 0, timeout=10)
    log = predictor.log()
    stopped = re.search(rf"every caller of a batch of 1 left; after step (\d+)/{steps}", log)
    assert stopped and int(stopped[1]) < 50, log[-2000:]
    assert "request_id=left-stream model=qwen-image outcome=cancelled" in log


def test_a_retried_request_does_not_repeat_its_previews():
    """A batch that fails is run again request by request (``PipelineRunner``), and its
    previews are made again: the stream sends each once."""
    policy = BatchPolicy(max_batch_size=2, batch_wait_ms=500)
    model = QwenImageGenerationModel("retried", PredictorOptions(device="cpu", batching=policy))
    blank = Image.new("RGB", (256, 256))

    def process(jobs: list[Job]) -> list[list[Image.Image]]:
        for job in jobs:
            if job.on_partial:
                job.on_partial(0, 0, blank)
        if len(jobs) > 1:
            raise RuntimeError("a batch too large for the GPU")
        for job in jobs:
            if job.on_partial:
                job.on_partial(0, 1, blank)
        return [[blank] for _ in jobs]

    model.runner.process = process
    model.ready = True

    def request(prompt: str, **parameters: int) -> InferRequest:
        return InferRequest(
            model_name=model.name,
            infer_inputs=[InferInput(contract.PROMPT, [1], "BYTES", [prompt])],
            parameters={"width": 256, "height": 256, **parameters},
        )

    async def streamed() -> list[tuple[str, InferResponse]]:
        return [event async for event in model.predict_stream(request("a", partial_images=2))]

    async def both() -> list[tuple[str, InferResponse]]:
        events, _ = await asyncio.gather(streamed(), model.predict(request("b")))
        return events

    try:
        events = asyncio.run(both())
    finally:
        model.stop()
    assert [name for name, _ in events] == ["partial_image", "partial_image", "completed"]
    assert [event.parameters[contract.PARTIAL_IMAGE_INDEX] for _, event in events[:2]] == [0, 1]


# uvicorn's ASGI version: Starlette then watches for the client's leaving beside the sending.
UVICORN_SCOPE = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST"}


async def reads_nothing_more(message: dict) -> None:
    """The ``send`` of a client that stops reading once the response has started."""
    if message["type"] == "http.response.body":
        await asyncio.Event().wait()


async def leaves_soon() -> dict:
    """The ``receive`` of a client that leaves a moment after its request."""
    await asyncio.sleep(0.05)
    return {"type": "http.disconnect"}


def test_a_client_that_leaves_during_a_send_closes_the_streams_body():
    """A client that stops reading and leaves while an event is being sent: Starlette
    cancels the send, and the response closes its body, whose ``finally`` (giving the
    request up) runs at once rather than when the garbage collector gets to it."""
    closed: list[str] = []

    async def body():
        try:
            yield b"event: partial_image\n\n"
            yield b"event: completed\n\n"
        finally:
            closed.append("closed")

    async def scenario() -> list[str]:
        await EventStreamResponse(body())(UVICORN_SCOPE, leaves_soon, reads_nothing_more)
        return list(closed)  # before asyncio.run finalizes what is left

    assert asyncio.run(scenario()) == ["closed"]


def test_a_stream_its_client_left_during_a_send_leaves_nothing_in_reference_cycles():
    """Starlette sends the events in an anyio task group for uvicorn (ASGI 2.3), whose
    callback kept the send cancelled by the client's leaving, with the event being sent (a
    preview: megabytes), in a reference cycle: 1 MB a stream here until the garbage
    collector's pass."""

    async def body():
        yield b"x" * 1_000_000  # an event: a preview's base64
        yield b"event: completed\n\n"

    with collector_off():
        for _ in range(3):
            response = EventStreamResponse(body())
            asyncio.run(response(UVICORN_SCOPE, leaves_soon, reads_nothing_more))
        del response
        assert frames_holding(cyclic_garbage(), 1_000_000) == []


def test_a_stream_whose_sending_fails_raises_the_failure():
    async def body():
        yield b"event: partial_image\n\n"

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            raise OSError("the connection broke")

    async def stays() -> dict:
        await asyncio.Event().wait()  # the client never says it left
        return {"type": "http.disconnect"}

    async def scenario() -> None:
        await EventStreamResponse(body())(UVICORN_SCOPE, stays, send)

    with pytest.raises(OSError, match="the connection broke"):
        asyncio.run(asyncio.wait_for(scenario(), 5))


def test_a_stream_left_after_its_request_failed_leaves_no_unread_error(caplog):
    """A client that leaves a stream once its request has failed, before reading the
    failure: the failure was logged with the request's outcome, and asyncio has no
    "exception was never retrieved" to log about it (the stream's ``answer.cancel()``
    marks a finished task's exception as seen)."""
    model = QwenImageGenerationModel("failed-stream", PredictorOptions(device="cpu"))
    blank = Image.new("RGB", (256, 256))

    def process(jobs: list[Job]) -> list[list[Image.Image]]:
        jobs[0].on_partial(0, 0, blank)
        raise RuntimeError("CUDA error: an illegal memory access")

    model.runner.process = process
    model.ready = True
    request = InferRequest(
        model_name=model.name,
        infer_inputs=[InferInput(contract.PROMPT, [1], "BYTES", ["a"])],
        parameters={"width": 256, "height": 256, "partial_images": 1},
    )

    async def scenario() -> None:
        events = model.predict_stream(request)
        name, _ = await anext(events)
        assert name == "partial_image"
        await asyncio.sleep(0.5)  # the request fails meanwhile
        await events.aclose()
        del events
        gc.collect()

    try:
        with caplog.at_level(logging.WARNING):
            asyncio.run(scenario())
    finally:
        model.stop()
    assert "outcome=error" in caplog.text and "illegal memory access" in caplog.text
    assert "never retrieved" not in caplog.text


def test_a_request_that_fails_leaves_nothing_in_reference_cycles():
    """``CancelOnDisconnect``'s handler task holds the app's error, whose traceback holds
    the frames of the closures that refer to the task: the request (here its 1 MB upload)
    was kept until the garbage collector's pass."""
    received: list[str] = []

    async def app(scope: dict, receive, send) -> None:
        upload = bytes(1_000_000)  # noqa: F841
        await receive()
        raise RuntimeError("inference failed")

    async def receive() -> dict:
        received.append("message")
        if len(received) % 2:
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        pass

    async def scenario() -> str:
        try:  # not pytest.raises: its record of the error would hold the frames itself
            await CancelOnDisconnect(app)({"type": "http"}, receive, send)
        except RuntimeError as error:
            return str(error)
        return "answered"

    with collector_off():
        for _ in range(3):
            assert asyncio.run(scenario()) == "inference failed"
        assert frames_holding(cyclic_garbage(), 1_000_000) == []
