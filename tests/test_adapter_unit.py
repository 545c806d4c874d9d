"""The adapter in-process, with a fake predictor behind httpx's MockTransport (no network)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import http.server
import inspect
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, get_args

import httpx
import openai
import pydantic
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from openai_adapter import metrics as adapter_metrics
from openai_adapter.__main__ import configure_logging
from openai_adapter.app import GENERATION_MAX_BODY_BYTES, create_app
from openai_adapter.image_urls import host_allowed
from openai_adapter.local_stack import adapter_url
from openai_adapter.media import detect_image_format
from openai_adapter.middleware import loggable_path
from openai_adapter.protocol import ImageEditRequest, ImageGenerationRequest, OutputFormat
from openai_adapter.settings import Settings
from predictors import contract
from tests.servers import PROJECT_ROOT, uvicorn_server

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]
RETRY_LATER = {"retry-after": "5"}
NO_RETRY = {"x-should-retry": "false"}
BINARY_HEADER_2 = {contract.BINARY_HEADER_LENGTH: "2"}


def encode(size: tuple[int, int] = (64, 48), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, fmt)
    return buffer.getvalue()


def v2_answer(request: httpx.Request) -> httpx.Response:
    """A well-formed v2 JSON answer: one PNG per requested image, of the requested size."""
    body = json.loads(request.content)
    params = body["parameters"]
    count = params.get(contract.NUM_IMAGES, 1)
    seed = params.get(contract.SEED, 42)
    image = encode((params.get(contract.WIDTH, 64), params.get(contract.HEIGHT, 48)))
    outputs = [
        {
            "name": contract.IMAGES,
            "shape": [count],
            "datatype": "BYTES",
            "data": [contract.encode_bytes_for_rest(image)] * count,
        },
        {
            "name": contract.SEEDS,
            "shape": [count],
            "datatype": "INT64",
            "data": [seed + i for i in range(count)],
        },
    ]
    return httpx.Response(200, json={"id": body.get("id"), "outputs": outputs})


def v2_images(data: bytes) -> httpx.Response:
    """A v2 JSON answer carrying ``data`` as its one image."""
    outputs = [
        {"name": contract.IMAGES, "data": [contract.encode_bytes_for_rest(data)]},
        {"name": contract.SEEDS, "data": [1]},
    ]
    return httpx.Response(200, json={"outputs": outputs})


class FakePredictor:
    """Records the requests it gets and answers with ``handler``."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.handler: Handler = v2_answer

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    @property
    def last_body(self) -> dict[str, Any]:
        return json.loads(self.requests[-1].content)


@pytest.fixture
def predictor() -> FakePredictor:
    return FakePredictor()


@pytest.fixture
def make_client(predictor: FakePredictor) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(**settings: Any) -> TestClient:
        app = create_app(Settings(**settings), transport=httpx.MockTransport(predictor))
        client = TestClient(app).__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def assert_error(response: httpx.Response, status: int, code: str | None, param: str | None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param), error
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["message"]
    return error


def test_generation_translates_openai_fields(client: TestClient, predictor: FakePredictor):
    response = client.post(
        "/v1/images/generations",
        json={
            "prompt": "a cat",
            "n": 2,
            "size": "512x256",
            "quality": "low",
            "output_format": "webp",
            "output_compression": 70,
            "negative_prompt": "dogs",
            "true_cfg_scale": 2.5,
            "seed": 9,
            "user": "someone",
        },
    )
    assert response.status_code == 200, response.text
    body = predictor.last_body
    assert body["parameters"] == {
        contract.WIDTH: 512,
        contract.HEIGHT: 256,
        contract.NUM_INFERENCE_STEPS: 20,
        contract.TRUE_CFG_SCALE: 2.5,
        contract.SEED: 9,
        contract.NUM_IMAGES: 2,
        contract.OUTPUT_FORMAT: "webp",
        contract.OUTPUT_COMPRESSION: 70,
        contract.BINARY_DATA_OUTPUT: True,
    }
    inputs = {item["name"]: item["data"] for item in body["inputs"]}
    assert inputs == {contract.PROMPT: ["a cat"], contract.NEGATIVE_PROMPT: ["dogs"]}
    answer = response.json()
    assert answer["size"] == "512x256"
    assert answer["output_format"] == "png"  # what the bytes are, whatever was asked
    assert (answer["quality"], answer["background"]) == ("low", "opaque")
    assert [item["seed"] for item in answer["data"]] == [9, 10]
    plain = client.post("/v1/images/generations", json={"prompt": "a cat"}).json()
    assert "quality" not in plain  # the predictor's default steps: no level's
    assert plain["background"] == "opaque"


def test_defaults_are_left_to_the_predictor(client: TestClient, predictor: FakePredictor):
    assert client.post("/v1/images/generations", json={"prompt": "x", "size": "auto"}).is_success
    assert predictor.last_body["parameters"] == {contract.BINARY_DATA_OUTPUT: True}
    assert predictor.last_body["inputs"] == [
        {"name": contract.PROMPT, "shape": [1], "datatype": "BYTES", "data": ["x"]}
    ]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"size": "1024x512", "width": 256}, {contract.WIDTH: 256, contract.HEIGHT: 512}),
        ({"height": 320}, {contract.HEIGHT: 320}),
        ({"quality": "high", "num_inference_steps": 7}, {contract.NUM_INFERENCE_STEPS: 7}),
        ({"quality": "max"}, {contract.NUM_INFERENCE_STEPS: 100}),
        ({"quality": "standard"}, {}),
    ],
)
def test_size_and_quality_precedence(client, predictor, fields, expected):
    assert client.post("/v1/images/generations", json={"prompt": "x", **fields}).is_success
    params = dict(predictor.last_body["parameters"])
    params.pop(contract.BINARY_DATA_OUTPUT)
    assert params == expected


@pytest.mark.parametrize("field", ["n", "seed", "num_inference_steps", "true_cfg_scale"])
def test_a_boolean_is_no_number(client, predictor, field):
    """pydantic reads JSON's true as 1: {"n": true} was one image, where OpenAI refuses it."""
    response = client.post("/v1/images/generations", json={"prompt": "x", field: True})
    error = assert_error(response, 400, "invalid_value", field)
    assert error["message"] == f"Invalid value for '{field}': must be a number, not a boolean"
    assert not predictor.requests


def test_quality_steps_are_configurable(make_client, predictor, monkeypatch):
    monkeypatch.setenv("QWEN_ADAPTER_QUALITY_STEPS", '{"auto": 4, "high": 8}')
    client = make_client()
    for quality, steps in (("high", 8), ("auto", 4), (None, 4), ("low", None)):
        assert client.post(
            "/v1/images/generations", json={"prompt": "x", "quality": quality}
        ).is_success
        assert predictor.last_body["parameters"].get(contract.NUM_INFERENCE_STEPS) == steps


def test_a_model_with_its_own_quality_table(make_client, predictor, monkeypatch):
    """{} for a model (one running a step-distilled LoRA) leaves every quality to its
    predictor's default steps; the other model keeps the shared table."""
    monkeypatch.setenv("QWEN_ADAPTER_MODEL_QUALITY_STEPS", '{"qwen-image": {}}')
    client = make_client()
    for quality in ("low", "high", "max", None):
        assert client.post(
            "/v1/images/generations", json={"prompt": "x", "quality": quality}
        ).is_success
        assert contract.NUM_INFERENCE_STEPS not in predictor.last_body["parameters"]
    fields = {"prompt": "x", "quality": "high", "num_inference_steps": 4}
    assert client.post("/v1/images/generations", json=fields).is_success
    assert predictor.last_body["parameters"][contract.NUM_INFERENCE_STEPS] == 4

    files = {"image": ("a.png", encode((32, 32), "PNG"), "image/png")}
    data = {"prompt": "x", "model": "qwen-image-edit", "quality": "high"}
    assert client.post("/v1/images/edits", data=data, files=files).is_success
    assert predictor.last_body["parameters"][contract.NUM_INFERENCE_STEPS] == 50


def test_binary_outputs_are_read(client: TestClient, predictor: FakePredictor):
    image = encode((32, 16), "JPEG")
    header = json.dumps(
        {
            "outputs": [
                {
                    "name": contract.IMAGES,
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(image) + 4},
                },
                {"name": contract.SEEDS, "shape": [1], "datatype": "INT64", "data": [5]},
            ]
        }
    ).encode()
    content = header + len(image).to_bytes(4, "little") + image
    predictor.handler = lambda request: httpx.Response(
        200, content=content, headers={contract.BINARY_HEADER_LENGTH: str(len(header))}
    )
    answer = client.post("/v1/images/generations", json={"prompt": "x"}).json()
    assert (answer["size"], answer["output_format"], answer["data"][0]["seed"]) == (
        "32x16",
        "jpeg",
        5,
    )


def test_request_id_is_echoed_and_forwarded(client: TestClient, predictor: FakePredictor):
    response = client.post(
        "/v1/images/generations", json={"prompt": "x"}, headers={"x-request-id": "abc-1"}
    )
    assert response.headers["x-request-id"] == "abc-1"
    assert predictor.requests[-1].headers["x-request-id"] == "abc-1"
    assert predictor.last_body["id"] == "abc-1"
    generated = client.get("/v1/models", headers={"x-request-id": "bad id\twith spaces"})
    assert len(generated.headers["x-request-id"]) == 32
    assert client.get("/nowhere").headers["x-request-id"]


def test_a_request_id_ending_in_a_newline_is_replaced():
    """Sent straight to the app: HTTP parsers strip it today, but a newline must never
    reach a log line or the predictor (a regex's ``$`` also matches before a final one)."""
    app = create_app(Settings(), transport=httpx.MockTransport(v2_answer))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/health/live",
        "raw_path": b"/health/live",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"adapter"), (b"x-request-id", b"abc\n")],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(app(scope, receive, send))
    (start,) = [message for message in sent if message["type"] == "http.response.start"]
    assert start["status"] == 200
    request_id = dict(start["headers"])[b"x-request-id"]
    assert len(request_id) == 32 and b"abc" not in request_id


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"n": 11}, "n", "invalid_value"),
        ({"n": "many"}, "n", "invalid_value"),
        ({"size": "100x100"}, "size", "invalid_value"),
        ({"size": "big"}, "size", "invalid_value"),
        ({"size": "1024x1024\n"}, "size", "invalid_value"),
        ({"output_format": "bmp"}, "output_format", "invalid_value"),
        ({"output_format": "gif"}, "output_format", "unsupported_value"),
        ({"frame_count": 4}, "frame_count", "unsupported_value"),
        ({"svg": {"model": "x"}}, "svg", "unsupported_value"),
        ({"svg": "x"}, "svg", "invalid_value"),
        ({"complexity": "extreme"}, "complexity", "invalid_value"),
        ({"output_compression": 101}, "output_compression", "invalid_value"),
        ({"quality": "ultra"}, "quality", "invalid_value"),
        ({"prompt": ""}, "prompt", "invalid_value"),
        ({"prompt": None}, "prompt", "invalid_value"),
        ({"prompt": "a" * 32001}, "prompt", "invalid_value"),
        ({"negative_prompt": "a" * 32001}, "negative_prompt", "invalid_value"),
        ({"seeds": 3}, "seeds", "unknown_parameter"),
        ({"response_format": "url"}, "response_format", "unsupported_value"),
        ({"background": "transparent"}, "background", "unsupported_value"),
        ({"partial_images": 4}, "partial_images", "invalid_value"),
        ({"style": "anime"}, "style", "invalid_value"),
        ({"seed": -1}, "seed", "invalid_value"),
        ({"seed": contract.MAX_SEED + 1}, "seed", "invalid_value"),
        ({"seed": 2**63}, "seed", "invalid_value"),  # past an INT64
        ({"true_cfg_scale": "NaN"}, "true_cfg_scale", "invalid_value"),
        ({"true_cfg_scale": "inf"}, "true_cfg_scale", "invalid_value"),
    ],
)
def test_generation_validation_errors(client, predictor, fields, param, code):
    response = client.post("/v1/images/generations", json={"prompt": "x", **fields})
    assert_error(response, 400, code, param)
    assert not predictor.requests


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_a_cfg_scale_that_is_not_a_finite_number(client, predictor, literal):
    """JSON's non-standard literals, which Python's and pydantic's parsers accept, are
    refused, in a generation's body, a JSON edit's and a form."""
    body = b'{"prompt": "x", "true_cfg_scale": %s}' % literal
    headers = {"content-type": "application/json"}
    response = client.post("/v1/images/generations", content=body, headers=headers)
    assert_error(response, 400, "invalid_value", "true_cfg_scale")
    images = json.dumps([{"image_url": data_url(encode())}]).encode()
    body = b'{"prompt": "x", "images": %s, "true_cfg_scale": %s}' % (images, literal)
    response = client.post("/v1/images/edits", content=body, headers=headers)
    assert_error(response, 400, "invalid_value", "true_cfg_scale")
    response = client.post(
        "/v1/images/edits",
        data={"prompt": "x", "true_cfg_scale": literal.decode()},
        files={"image": ("a.png", encode(), "image/png")},
    )
    assert_error(response, 400, "invalid_value", "true_cfg_scale")
    assert not predictor.requests


@pytest.mark.parametrize(
    ("method", "request_model"),
    [("generate", ImageGenerationRequest), ("edit", ImageEditRequest)],
)
def test_the_installed_sdk_sends_no_field_the_adapter_does_not_know(method, request_model):
    """Every parameter of the installed ``openai`` SDK's ``images.generate`` and
    ``images.edit`` is a field of the adapter's request: each is served, ignored or refused
    as docs/adapter.md says, never an ``unknown_parameter``. A newer SDK that adds one fails
    here, naming it."""
    transport_options = {"self", "extra_headers", "extra_query", "extra_body", "timeout"}
    sdk_params = set(inspect.signature(getattr(openai.resources.images.Images, method)).parameters)
    fields = {field.alias or name for name, field in request_model.model_fields.items()}
    assert sdk_params - transport_options - fields == set(), openai.__version__


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"svg[model]": "x"}, "svg", "unsupported_value"),
        ({"svg[reasoning][effort]": "low", "svg[model]": "x"}, "svg", "unsupported_value"),
        ({"complexity": "low", "style[name]": "x"}, "style", "unknown_parameter"),
        ({"prompt[0]": "x"}, "prompt", "invalid_value"),
    ],
)
def test_form_fields_with_keys_in_brackets(client, predictor, fields, param, code):
    """The openai SDK sends an object's fields in a form as ``name[key]``; they are read as
    that object, so ``svg`` gets the answer it gets in JSON rather than an unknown field."""
    response = client.post(
        "/v1/images/edits",
        data={"prompt": "x", **fields},
        files={"image": ("a.png", encode(), "image/png")},
    )
    assert_error(response, 400, code, param)
    assert not predictor.requests


def test_the_largest_seed_is_the_contracts(client, predictor):
    """A seed up to ``contract.MAX_SEED`` reaches the predictor, whose INT64 seeds of
    ``seed + i`` it keeps in range; one past it is refused in a form too."""
    fields = {"prompt": "x", "seed": contract.MAX_SEED}
    assert client.post("/v1/images/generations", json=fields).is_success
    assert predictor.last_body["parameters"][contract.SEED] == contract.MAX_SEED
    response = client.post(
        "/v1/images/edits",
        data={"prompt": "x", "seed": str(contract.MAX_SEED + 1)},
        files={"image": ("a.png", encode(), "image/png")},
    )
    assert_error(response, 400, "invalid_value", "seed")


def test_a_stream_sends_one_completed_event_per_image(client, predictor):
    """``stream: true`` answers with server-sent events, OpenAI's framing: ``event:`` the
    type, ``data:`` its JSON, a blank line; one event per image, once they are done."""
    response = client.post(
        "/v1/images/generations",
        json={
            "prompt": "a cat",
            "n": 2,
            "seed": 9,
            "stream": True,
            "quality": "low",
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert predictor.requests[-1].url.path == "/v2/models/qwen-image/infer"
    events = response.text.split("\n\n")
    assert events[-1] == "" and len(events) == 3
    for event, seed in zip(events[:-1], [9, 10], strict=True):
        name, data = event.split("\n")
        assert name == "event: image_generation.completed"
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == "image_generation.completed"
        assert (payload["seed"], payload["quality"]) == (seed, "low")
        assert payload["background"] == "opaque"
        assert (payload["size"], payload["output_format"]) == ("64x48", "png")
        assert base64.b64decode(payload["b64_json"]).startswith(b"\x89PNG")
    edited = client.post(
        "/v1/images/edits",
        data={"prompt": "a hat", "stream": "true"},
        files={"image": ("upload", encode(), "image/png")},
    )
    assert edited.text.startswith("event: image_edit.completed\ndata: ")


def v2_stream(*events: tuple[str, Any]) -> httpx.Response:
    """A predictor's ``infer_stream`` answer of ``events`` (name, JSON data)."""
    content = "".join(
        f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n" for name, data in events
    )
    return httpx.Response(200, text=content, headers={"content-type": "text/event-stream"})


def v2_preview(image_index: int, partial_image_index: int, seed: int) -> tuple[str, Any]:
    """A ``partial_image`` event: one 32x24 preview."""
    output = {"name": contract.IMAGES, "data": [contract.encode_bytes_for_rest(encode((32, 24)))]}
    parameters = {
        contract.IMAGE_INDEX: image_index,
        contract.PARTIAL_IMAGE_INDEX: partial_image_index,
        contract.SEED: seed,
    }
    return contract.PARTIAL_IMAGE_EVENT, {"outputs": [output], "parameters": parameters}


def streaming_predictor(*events: tuple[str, Any]) -> Handler:
    """A predictor answering ``infer_stream`` with ``events`` then, unless the events end
    otherwise, the request's images."""

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path.endswith("/infer_stream"), request.url
        completed = (contract.COMPLETED_EVENT, v2_answer(request).json())
        return v2_stream(*events, completed)

    return answer


def sse_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.split("\n\n")[:-1]:
        name, data = block.split("\n")
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


# (request fields, the quality the answer reports) with the default quality table:
# low 20, medium 30, high 50, hd 50, xhigh 75, max 100 steps; auto and standard unlisted.
REPORTED_QUALITIES = [
    ({}, None),
    ({"quality": "auto"}, None),
    ({"quality": "standard"}, None),
    ({"quality": "low"}, "low"),
    ({"quality": "medium"}, "medium"),
    ({"quality": "high"}, "high"),
    ({"quality": "hd"}, "high"),
    ({"quality": "xhigh"}, "xhigh"),
    ({"quality": "max"}, "max"),
    ({"num_inference_steps": 30}, "medium"),
    ({"quality": "low", "num_inference_steps": 50}, "high"),
    ({"num_inference_steps": 37}, None),
]


@pytest.mark.parametrize(("fields", "reported"), REPORTED_QUALITIES)
def test_answers_and_events_are_what_the_openai_sdk_types_say(client, predictor, fields, reported):
    """Validated with the SDK's own models, which its clients' code is typed against (the
    SDK builds them unchecked). An answer's ``quality`` is the level whose steps made the
    images, left out where none is (OpenAI's answers allow no 'auto', 'standard' or 'hd');
    an event's is 'auto' there. Completed events carry the ``usage`` the SDK requires."""
    request = {"prompt": "a cat", **fields}
    answer = client.post("/v1/images/generations", json=request).json()
    assert openai.types.ImagesResponse.model_validate(answer).quality == reported
    assert ("quality" in answer) == (reported is not None)

    predictor.handler = streaming_predictor(v2_preview(0, 0, 42))
    streamed = client.post(
        "/v1/images/generations", json={**request, "stream": True, "partial_images": 1}
    )
    predictor.handler = v2_answer
    edited = client.post(
        "/v1/images/edits",
        data={**{name: str(value) for name, value in request.items()}, "stream": "true"},
        files={"image": ("cat.png", encode(), "image/png")},
    )
    for response, event_types in (
        (streamed, openai.types.ImageGenStreamEvent),
        (edited, openai.types.ImageEditStreamEvent),
    ):
        events = sse_events(response)
        assert events
        for _, data in events:
            event = pydantic.TypeAdapter(event_types).validate_python(data)
            assert event.quality == (reported or "auto")
            if event.type.endswith(".completed"):
                assert event.usage.total_tokens == 0


def test_partial_images_come_from_the_predictors_stream(client, predictor):
    """``partial_images`` in a stream: the call goes to the predictor's ``infer_stream``
    with the count (and no binary outputs, which its events cannot carry), each preview
    becomes a ``partial_image`` event in OpenAI's shape, then each image a completed one."""
    predictor.handler = streaming_predictor(v2_preview(0, 0, 9), v2_preview(1, 0, 10))
    response = client.post(
        "/v1/images/generations",
        json={"prompt": "a cat", "n": 2, "seed": 9, "stream": True, "partial_images": 1},
    )
    events = sse_events(response)
    assert [name for name, _ in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
        "image_generation.completed",
    ]
    assert response.headers["x-accel-buffering"] == "no"  # ingress-nginx: pass events on
    parameters = predictor.last_body["parameters"]
    assert parameters[contract.PARTIAL_IMAGES] == 1
    assert contract.BINARY_DATA_OUTPUT not in parameters
    for (name, data), seed in zip(events[:2], [9, 10], strict=True):
        assert data["type"] == name
        assert (data["partial_image_index"], data["seed"]) == (0, seed)
        assert (data["size"], data["output_format"]) == ("32x24", "png")
        assert (data["quality"], data["background"]) == ("auto", "opaque")
        assert base64.b64decode(data["b64_json"]) == encode((32, 24))
        assert data["created_at"] > 0
    assert [data["seed"] for _, data in events[2:]] == [9, 10]
    predictor.handler = streaming_predictor(v2_preview(0, 0, 42))
    edited = client.post(
        "/v1/images/edits",
        data={"prompt": "a hat", "stream": "true", "partial_images": "1"},
        files={"image": ("upload", encode(), "image/png")},
    )
    assert [name for name, _ in sse_events(edited)] == [
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    assert predictor.requests[-1].url.path == "/v2/models/qwen-image-edit/infer_stream"


def test_partial_images_without_a_stream_are_ignored(client, predictor):
    response = client.post("/v1/images/generations", json={"prompt": "a", "partial_images": 2})
    assert response.status_code == 200, response.text
    assert predictor.requests[-1].url.path.endswith("/infer")
    assert contract.PARTIAL_IMAGES not in predictor.last_body["parameters"]


@pytest.mark.parametrize(
    ("events", "code", "message"),
    [
        (
            [(contract.ERROR_EVENT, {"error": "shutting down", "status": 503})],
            "predictor_busy",
            "busy or not ready (shutting down)",
        ),
        (
            [(contract.ERROR_EVENT, {"error": "CUDA OOM", "status": 500})],
            "inference_error",
            "failed: CUDA OOM",
        ),
        (  # a Unicode line separator, which JSON leaves unescaped, ends no line of a stream
            [(contract.ERROR_EVENT, {"error": "CUDA\u2028OOM\u0085", "status": 500})],
            "inference_error",
            "failed: CUDA\u2028OOM\u0085",
        ),
        ([("surprise", {})], "predictor_error", "unknown event 'surprise'"),
        ([(contract.PARTIAL_IMAGE_EVENT, {"outputs": []})], "predictor_error", "invalid answer"),
    ],
    ids=["busy", "failed", "line-separator", "unknown-event", "bad-preview"],
)
def test_a_stream_failing_after_its_first_event_ends_with_an_error_event(
    client, predictor, events, code, message, caplog
):
    """Once the first event is sent, the status is too: a failure becomes an ``error``
    event with OpenAI's error body, the stream's last, and is logged and counted."""
    predictor.handler = lambda request: v2_stream(v2_preview(0, 0, 42), *events)
    errors = {"code": code}
    before = REGISTRY.get_sample_value("qwen_image_adapter_stream_errors_total", errors) or 0
    with caplog.at_level(logging.WARNING, logger="openai_adapter"):
        response = client.post(
            "/v1/images/generations",
            json={"prompt": "a", "stream": True, "partial_images": 2},
            headers={"x-request-id": "failed-stream"},
        )
    events_sent = sse_events(response)
    assert [name for name, _ in events_sent] == ["image_generation.partial_image", "error"]
    error = events_sent[-1][1]
    assert error["type"] == "error"
    assert set(error["error"]) == {"message", "type", "param", "code"}  # as error bodies
    assert error["error"]["code"] == code
    assert message in error["error"]["message"]
    after = REGISTRY.get_sample_value("qwen_image_adapter_stream_errors_total", errors)
    assert after == before + 1
    assert f"request_id=failed-stream stream ended by an error: {code}" in caplog.text


def test_a_stream_ends_with_a_timeout_event_at_the_requests_deadline(make_client, predictor):
    """The request timeout bounds the whole stream, not the wait for each event: a stream
    whose previews keep coming would otherwise outlast every proxy's timeout and the
    adapter pod's grace period, and be cut with no error."""
    client = make_client(request_timeout_seconds=1.0)

    async def previews_every_0_4_s() -> AsyncIterator[bytes]:
        for index in range(5):  # 2 s in all
            yield v2_stream(v2_preview(0, index % 3, 42)).content
            await asyncio.sleep(0.4)

    predictor.handler = lambda request: httpx.Response(200, content=previews_every_0_4_s())
    started = time.monotonic()
    response = client.post(
        "/v1/images/generations", json={"prompt": "a", "stream": True, "partial_images": 3}
    )
    waited = time.monotonic() - started
    events = sse_events(response)
    assert [name for name, _ in events][-1] == "error", [name for name, _ in events]
    assert 1 <= len(events) - 1 <= 3  # the previews of the first second
    error = events[-1][1]["error"]
    assert error["code"] == "predictor_timeout"
    assert "The request's 1 seconds ran out before the 'qwen-image' predictor's" in error["message"]
    assert 0.9 < waited < 1.8


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_waits_for_its_predictor_no_longer_than_its_deadline(
    make_client, predictor, stream
):
    """The time a request's body took to arrive counts against its timeout: the predictor
    gets what is left of it."""
    client = make_client(request_timeout_seconds=1.5)

    async def answer_in_a_second(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(1.0)
        return v2_answer(request)

    def body_in_a_second() -> Iterator[bytes]:
        yield b'{"prompt": "a slow upload", '
        time.sleep(1.0)
        yield b'"stream": ' + json.dumps(stream).encode() + b"}"

    predictor.handler = answer_in_a_second
    response = client.post("/v1/images/generations", content=b'{"prompt": "a"}')
    assert response.status_code == 200, response.text
    response = client.post("/v1/images/generations", content=body_in_a_second())
    assert_error(response, 504, "predictor_timeout", None)


def test_a_stream_event_that_is_not_utf_8_ends_with_an_error_event(client, predictor):
    preview = v2_stream(v2_preview(0, 0, 42)).content
    broken = b'event: error\ndata: {"error": "\xff", "status": 500}\n\n'
    predictor.handler = lambda request: httpx.Response(200, content=preview + broken)
    response = client.post(
        "/v1/images/generations", json={"prompt": "a", "stream": True, "partial_images": 2}
    )
    (_, (name, data)) = sse_events(response)
    assert (name, data["error"]["code"]) == ("error", "predictor_error")
    assert "sent an invalid answer" in data["error"]["message"]


def test_a_stream_that_ends_without_its_images_ends_with_an_error_event(client, predictor):
    predictor.handler = lambda request: v2_stream(v2_preview(0, 0, 42))
    response = client.post(
        "/v1/images/generations", json={"prompt": "a", "stream": True, "partial_images": 2}
    )
    (_, (name, data)) = sse_events(response)
    assert (name, data["error"]["code"]) == ("error", "predictor_error")
    assert "ended its stream early" in data["error"]["message"]


BAD_WIDTH = "'width' must be a multiple of 16, got 8"


@pytest.mark.parametrize(
    ("answer", "status", "code", "param"),
    [
        (httpx.Response(400, json={"error": BAD_WIDTH}), 400, "invalid_value", "width"),
        (httpx.Response(503, json={"error": "Server is busy"}), 503, "predictor_busy", None),
        (httpx.ConnectError("refused"), 503, "predictor_unavailable", None),
        (v2_stream(), 502, "predictor_error", None),
    ],
    ids=["invalid", "busy", "unreachable", "empty"],
)  # fmt: skip
def test_a_stream_refused_before_its_first_event_gets_an_error_status(
    client, predictor, answer, status, code, param
):
    """Before the first event nothing is sent: the client gets the error's own status and
    body, as without a stream."""

    def refuse(request: httpx.Request) -> httpx.Response:
        if isinstance(answer, Exception):
            raise answer
        return answer

    predictor.handler = refuse
    response = client.post(
        "/v1/images/generations",
        json={"prompt": "a", "stream": True, "partial_images": 1, "width": 8, "height": 64},
    )
    assert_error(response, status, code, param)


def test_the_sdk_raises_a_streams_error_event(client, predictor):
    """The openai SDK reads an ``error`` event as an ``APIError`` with its message."""
    predictor.handler = lambda request: v2_stream(
        v2_preview(0, 0, 42), (contract.ERROR_EVENT, {"error": "shutting down", "status": 503})
    )
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    events = sdk.images.generate(prompt="a", stream=True, partial_images=2)
    first = next(iter(events))
    assert first.type == "image_generation.partial_image"
    with pytest.raises(openai.APIError, match="busy or not ready"):
        list(events)


def test_missing_prompt_and_bad_json(client: TestClient):
    assert_error(
        client.post("/v1/images/generations", json={}), 400, "missing_required_parameter", "prompt"
    )
    response = client.post(
        "/v1/images/generations", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "invalid_json", None)


def test_an_edit_that_is_neither_a_form_nor_json(client, predictor):
    response = client.post(
        "/v1/images/edits", content=b"prompt=x", headers={"content-type": "text/plain"}
    )
    error = assert_error(response, 400, "invalid_content_type", None)
    assert "multipart/form-data" in error["message"] and "JSON" in error["message"]
    response = client.post("/v1/images/edits", json={"prompt": "make it blue", "image": "x"})
    assert_error(response, 400, "missing_required_parameter", "images")  # a JSON edit's field
    response = client.post(
        "/v1/images/edits", content=b"", headers={"content-type": "application/json"}
    )
    error = assert_error(response, 400, "invalid_json", None)
    assert error["message"] == "Missing request body: send a JSON object"
    response = client.post(
        "/v1/images/edits", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in assert_error(response, 400, "invalid_json", None)["message"]
    assert not predictor.requests


@pytest.mark.parametrize(
    ("path", "content", "content_type", "code", "message"),
    [
        (
            "/v1/images/generations",
            b'{"prompt": "caf\xe9"}',  # Latin-1
            "application/json",
            "invalid_json",
            "The request body is not valid JSON (UTF-8): invalid unicode code point",
        ),
        (
            "/v1/images/edits",
            b"prompt=x",
            "multipart/form-data",
            "invalid_content_type",
            "The multipart/form-data body cannot be read: Missing boundary in multipart.",
        ),
        (
            "/v1/images/edits",
            b"garbage\r\n--x--",
            "multipart/form-data; boundary=x",
            "invalid_content_type",
            "The multipart/form-data body cannot be read: Invalid multipart data.",
        ),
    ],
    ids=["json-not-utf-8", "multipart-without-boundary", "multipart-garbage"],
)
def test_a_malformed_body_has_a_code(client, predictor, path, content, content_type, code, message):
    response = client.post(path, content=content, headers={"content-type": content_type})
    assert assert_error(response, 400, code, None)["message"].startswith(message)
    assert not predictor.requests


@pytest.mark.parametrize(
    ("content", "content_type", "message"),
    [
        (b"", None, "Missing request body"),
        (b"", "application/json", "Missing request body"),
        (b'[{"prompt": "x"}]', "application/json", "must be a JSON object"),
        (b'{"prompt": "x"}', "text/plain", "must be a JSON object"),
    ],
)
def test_a_body_that_is_not_a_json_object(client, predictor, content, content_type, message):
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/images/generations", content=content, headers=headers)
    assert message in assert_error(response, 400, "invalid_json", None)["message"]
    assert not predictor.requests


def test_a_field_named_body_is_an_unknown_field(client, predictor):
    """Only the location's leading "body" (FastAPI's) is dropped, not a client's field."""
    response = client.post("/v1/images/generations", json={"prompt": "x", "body": 1})
    error = assert_error(response, 400, "unknown_parameter", "body")
    assert error["message"] == "Unrecognized request argument supplied: body"
    response = client.post(
        "/v1/images/edits",
        data={"prompt": "x", "body": "1"},
        files={"image": ("a.png", encode(), "image/png")},
    )
    assert_error(response, 400, "unknown_parameter", "body")
    assert not predictor.requests


@pytest.mark.parametrize(
    ("predictor_message", "fields", "param", "message_start"),
    [
        (
            "'num_images' must be between 1 and 4, got 5",
            {"n": 5},
            "n",
            "'n' must be between 1 and 4, got 5",
        ),
        (
            "'width' must be between 256 and 2048, got 4096",
            {"size": "4096x512"},
            "size",
            "'size' (as 'width') must be",
        ),
        ("'width' must be between 256 and 2048, got 4096", {"width": 4096}, "width", "'width' m"),
        ("'width' is required when the other side is given", {"height": 64}, "width", "'width'"),
        (  # the steps that quality 'max' stands for, which the client did not send
            "'num_inference_steps' must be between 2 and 60, got 100",
            {"quality": "max"},
            "quality",
            "'quality' (as 'num_inference_steps') must be between 2 and 60, got 100",
        ),
        (
            "'true_cfg_scale' must be at most 20.0",
            {"true_cfg_scale": 50},
            "true_cfg_scale",
            "'true",
        ),
        ("something odd", {}, None, "something odd"),
    ],
)
def test_predictor_400_names_the_clients_field(
    client, predictor, predictor_message, fields, param, message_start
):
    predictor.handler = lambda request: httpx.Response(400, json={"error": predictor_message})
    response = client.post("/v1/images/generations", json={"prompt": "x", **fields})
    error = assert_error(response, 400, "invalid_value", param)
    assert error["message"].startswith(message_start)


def test_a_predictor_refusing_the_images_names_the_edits_field(client, predictor):
    """The v2 ``image`` input is the form's ``image`` and a JSON edit's ``images``."""
    refusal = "'image' holds 2 images; this deployment edits from at most 1"
    predictor.handler = lambda request: httpx.Response(400, json={"error": refusal})
    images = [{"image_url": data_url(encode())}] * 2
    response = client.post("/v1/images/edits", json={"prompt": "x", "images": images})
    error = assert_error(response, 400, "invalid_value", "images")
    assert error["message"] == "'images' holds 2 images; this deployment edits from at most 1"
    response = client.post(
        "/v1/images/edits",
        data={"prompt": "x"},
        files=[("image[]", ("a.png", encode(), "image/png"))] * 2,
    )
    assert assert_error(response, 400, "invalid_value", "image")["message"] == refusal


@pytest.mark.parametrize(
    ("answer", "status", "code", "headers"),
    [
        (httpx.Response(503, json={"error": "Server is busy"}), 503, "predictor_busy", RETRY_LATER),
        (httpx.Response(500, json={"error": "CUDA OOM"}), 500, "inference_error", NO_RETRY),
        # Another status (a gateway's, say) may pass on a retry; an unusable answer to work
        # done would come again.
        (httpx.Response(404, text="no such model"), 502, "predictor_error", {}),
        (httpx.Response(200, json={"outputs": []}), 502, "predictor_error", NO_RETRY),
        (httpx.Response(200, json=[{"outputs": []}]), 502, "predictor_error", NO_RETRY),
        (
            httpx.Response(200, content=b"[]", headers=BINARY_HEADER_2),
            502, "predictor_error", NO_RETRY,
        ),
        (v2_images(b"not an image"), 502, "predictor_error", NO_RETRY),
        (v2_images(b"\x89PNG\r\n\x1a\n but not really"), 502, "predictor_error", NO_RETRY),
    ],
)  # fmt: skip
def test_predictor_failures(client, predictor, answer, status, code, headers):
    predictor.handler = lambda request: answer
    response = client.post("/v1/images/generations", json={"prompt": "x"})
    assert_error(response, status, code, None)
    for name, value in headers.items():
        assert response.headers[name] == value
    assert ("x-should-retry" in response.headers) == (headers == NO_RETRY)


@pytest.mark.parametrize(
    ("exception", "status", "code"),
    [
        (httpx.ConnectError("refused"), 503, "predictor_unavailable"),
        (httpx.ConnectTimeout("slow"), 503, "predictor_unavailable"),
        (httpx.PoolTimeout("full"), 503, "predictor_unavailable"),
        (httpx.RemoteProtocolError("closed"), 503, "predictor_unavailable"),
        (httpx.ReadTimeout("slow"), 504, "predictor_timeout"),
    ],
)
def test_transport_failures(client, predictor, exception, status, code):
    def fail(request: httpx.Request) -> httpx.Response:
        raise exception

    predictor.handler = fail
    response = client.post("/v1/images/generations", json={"prompt": "x"})
    assert_error(response, status, code, None)
    if status == 503:
        assert response.headers["retry-after"] == "5"
    else:
        assert response.headers["x-should-retry"] == "false"


def test_models_and_switched_off_model(make_client, predictor):
    client = make_client(edit_url="")
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["qwen-image"]
    assert client.get("/v1/models/qwen-image").json()["object"] == "model"
    assert_error(client.get("/v1/models/qwen-image-edit"), 404, "model_not_found", "model")
    files = {"image": ("upload", encode(), "application/octet-stream")}
    response = client.post("/v1/images/edits", data={"prompt": "x"}, files=files)
    assert_error(response, 404, "model_not_found", "model")
    response = client.post("/v1/images/generations", json={"prompt": "x", "model": "dall-e-3"})
    assert_error(response, 404, "model_not_found", "model")
    response = make_client().post(
        "/v1/images/generations", json={"prompt": "x", "model": "qwen-image-edit"}
    )
    assert_error(response, 400, "invalid_value", "model")
    assert not predictor.requests


def test_model_aliases(make_client, predictor):
    """Clients that send OpenAI's model names reach the endpoint's model when the deployment
    lists those names as its aliases; one name may alias both endpoints' models."""
    client = make_client(
        generation_model_aliases=["gpt-image-1", "dall-e-3"],
        edit_model_aliases=["gpt-image-1", "dall-e-2"],
    )
    for alias in ("gpt-image-1", "dall-e-3"):
        response = client.post("/v1/images/generations", json={"prompt": "x", "model": alias})
        assert response.status_code == 200, response.text
        assert predictor.requests[-1].url.path == "/v2/models/qwen-image/infer"
    files = {"image": ("upload", encode(), "image/png")}
    for alias in ("gpt-image-1", "dall-e-2"):
        response = client.post(
            "/v1/images/edits", data={"prompt": "x", "model": alias}, files=files
        )
        assert response.status_code == 200, response.text
        assert predictor.requests[-1].url.path == "/v2/models/qwen-image-edit/infer"
    sent = len(predictor.requests)
    response = client.post("/v1/images/generations", json={"prompt": "x", "model": "dall-e-2"})
    error = assert_error(response, 400, "invalid_value", "model")
    assert error["message"] == (
        "The model 'dall-e-2' does not serve this endpoint; use 'qwen-image'"
    )
    response = client.post("/v1/images/generations", json={"prompt": "x", "model": "dall-e-1"})
    assert_error(response, 404, "model_not_found", "model")
    assert len(predictor.requests) == sent
    listed = [card["id"] for card in client.get("/v1/models").json()["data"]]
    assert listed == ["qwen-image", "qwen-image-edit"], "aliases are names, not more models"
    assert client.get("/v1/models/dall-e-3").json()["id"] == "dall-e-3"
    switched_off = make_client(edit_url="", edit_model_aliases=["dall-e-2"])
    assert_error(switched_off.get("/v1/models/dall-e-2"), 404, "model_not_found", "model")
    with pytest.raises(ValueError, match="the alias 'qwen-image-edit' is a model's id"):
        Settings(generation_model_aliases=["qwen-image-edit"])
    with pytest.raises(ValueError, match="both models have the id 'qwen-image'"):
        Settings(edit_model="qwen-image")


def test_an_alias_of_both_models_with_the_edit_model_switched_off(make_client, predictor):
    """Edits have no model to run: whatever the request names, it is not found."""
    client = make_client(
        edit_url="", generation_model_aliases=["gpt-image-1"], edit_model_aliases=["gpt-image-1"]
    )
    files = {"image": ("a.png", encode(), "image/png")}
    for model in ("gpt-image-1", "qwen-image"):
        response = client.post(
            "/v1/images/edits", data={"prompt": "x", "model": model}, files=files
        )
        error = assert_error(response, 404, "model_not_found", "model")
        assert error["message"] == (
            f"The model '{model}' does not exist for this endpoint, whose model "
            "'qwen-image-edit' is switched off"
        )
    response = client.post("/v1/images/generations", json={"prompt": "x", "model": "gpt-image-1"})
    assert response.status_code == 200, response.text


def test_edit_sends_the_image(client: TestClient, predictor: FakePredictor):
    image = encode((96, 64), "WEBP")
    response = client.post(
        "/v1/images/edits",
        data={"prompt": "hat", "n": "2", "seed": "3", "true_cfg_scale": "1.5"},
        files=[("image[]", ("upload", image, "application/octet-stream"))],
    )
    assert response.status_code == 200, response.text
    assert predictor.requests[-1].url.path == "/v2/models/qwen-image-edit/infer"
    body = predictor.last_body
    inputs = {item["name"]: item["data"][0] for item in body["inputs"]}
    assert contract.decode_bytes_from_rest(contract.IMAGE, inputs[contract.IMAGE]) == image
    assert body["parameters"][contract.TRUE_CFG_SCALE] == 1.5
    assert [item["seed"] for item in response.json()["data"]] == [3, 4]


@pytest.mark.parametrize("field", ["image", "image[]"])
def test_edit_sends_several_images_in_order(client: TestClient, predictor: FakePredictor, field):
    """How many the model takes is the predictor's to say: the adapter sends them all."""
    images = [encode((96, 64), "WEBP"), encode((64, 64)), encode((32, 64), "JPEG")]
    response = client.post(
        "/v1/images/edits",
        data={"prompt": "put them together"},
        files=[(field, ("upload", image, "application/octet-stream")) for image in images],
    )
    assert response.status_code == 200, response.text
    (sent,) = [item for item in predictor.last_body["inputs"] if item["name"] == contract.IMAGE]
    assert sent["shape"] == [3]
    assert [
        contract.decode_bytes_from_rest(contract.IMAGE, item) for item in sent["data"]
    ] == images


@pytest.mark.parametrize(
    ("files", "param", "code"),
    [
        ([], "image", "missing_required_parameter"),
        ([("image", b"GIF89a....")], "image", "invalid_image_format"),
        ([("image", b"")], "image", "invalid_image_format"),
        ([("image", encode()), ("image[]", b"GIF89a....")], "image", "invalid_image_format"),
        ([("image[]", encode())] * 17, "image", "invalid_value"),
        ([("image", encode()), ("mask", b"GIF89a....")], "mask", "invalid_image_format"),
        ([("image", b"\x89PNG\r\n\x1a\n" + bytes(60_000))], "image", "image_too_large"),
        ([("image[]", b"\x89PNG\r\n\x1a\n" + bytes(30_000))] * 2, "image", "image_too_large"),
        (
            [(name, b"\x89PNG\r\n\x1a\n" + bytes(30_000)) for name in ("image", "mask")],
            "mask",
            "image_too_large",
        ),
    ],
    ids=[
        "missing",
        "gif",
        "empty",
        "second-a-gif",
        "more-than-openai-allows",
        "mask-a-gif",
        "too-large",
        "too-large-together",
        "too-large-with-the-mask",
    ],
)
def test_edit_errors(make_client, predictor, files, param, code):
    client = make_client(max_upload_bytes=50_000)
    parts = [(name, ("upload", data, "application/octet-stream")) for name, data in files]
    response = client.post("/v1/images/edits", data={"prompt": "x"}, files=parts or None)
    assert_error(response, 400, code, param)
    assert not predictor.requests


def test_edit_sends_the_mask(client: TestClient, predictor: FakePredictor):
    """The mask travels as the v2 ``mask`` input; whether it fits the image is the
    predictor's to say."""
    images, mask = [encode((96, 64)), encode((64, 64))], encode((96, 64))
    response = client.post(
        "/v1/images/edits",
        data={"prompt": "a hat"},
        files=[("mask", ("mask.png", mask, "image/png"))]
        + [("image[]", ("upload", image, "image/png")) for image in images],
    )
    assert response.status_code == 200, response.text
    sent = {item["name"]: item for item in predictor.last_body["inputs"]}
    assert sent[contract.MASK]["shape"] == [1]
    assert contract.decode_bytes_from_rest(contract.MASK, sent[contract.MASK]["data"][0]) == mask
    assert [
        contract.decode_bytes_from_rest(contract.IMAGE, item)
        for item in sent[contract.IMAGE]["data"]
    ] == images


def test_edit_errors_say_which_of_several_images(make_client, predictor):
    client = make_client(max_upload_bytes=50_000)
    parts = [
        (name, ("upload", data, "application/octet-stream"))
        for name, data in [("image[]", encode()), ("image[]", b"GIF89a....")]
    ]
    response = client.post("/v1/images/edits", data={"prompt": "x"}, files=parts)
    assert response.json()["error"]["message"] == "Image 2 of 2 must be a PNG, JPEG or WebP file"
    parts = [("image[]", ("upload", b"\x89PNG\r\n\x1a\n" + bytes(30_000), "image/png"))] * 2
    response = client.post("/v1/images/edits", data={"prompt": "x"}, files=parts)
    assert response.json()["error"]["message"] == (
        "The images together are larger than 50000 bytes"
    )
    parts = [
        ("image", ("upload", encode(), "image/png")),
        ("mask", ("upload", b"GIF89a....", "image/gif")),
    ]
    response = client.post("/v1/images/edits", data={"prompt": "x"}, files=parts)
    assert response.json()["error"]["message"].startswith("The mask must be a PNG or WebP file")
    assert not predictor.requests


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def sent_images(predictor: FakePredictor) -> dict[str, list[bytes]]:
    """The image and mask inputs of the predictor's last request, decoded."""
    return {
        item["name"]: [contract.decode_bytes_from_rest(item["name"], d) for d in item["data"]]
        for item in predictor.last_body["inputs"]
        if item["name"] in (contract.IMAGE, contract.MASK)
    }


def test_a_json_edit_of_a_million_small_objects_is_refused_before_it_is_parsed(
    client: TestClient, predictor: FakePredictor
):
    """Parsed, such a body (29 MB: 1.8 million objects) held the event loop 5 s and took
    1.2 GB. Counted first; texts of the longest allowed, all braces, still pass."""
    objects = json.dumps({"prompt": "x", "images": [{"file_id": "a"}] * 200_000})
    response = client.post(
        "/v1/images/edits", content=objects, headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "invalid_json", None)
    assert "more than 128000 '{' and '['" in response.json()["error"]["message"]
    assert predictor.requests == []

    braces = {"prompt": "{" * 32000, "negative_prompt": "[" * 32000}
    edit = {**braces, "images": [{"image_url": data_url(encode())}]}
    assert client.post("/v1/images/edits", json=edit).status_code == 200


def test_a_json_edit_sends_its_data_urls(client: TestClient, predictor: FakePredictor):
    """OpenAI's JSON edit body: the images and the mask as data URLs, in order, with the
    fields that the form takes."""
    images, mask = [encode((96, 64), "WEBP"), encode((64, 64), "JPEG")], encode((96, 64))
    response = client.post(
        "/v1/images/edits",
        json={
            "prompt": "a hat",
            "images": [
                {"image_url": data_url(images[0], "image/webp")},
                # base64 in lines, as the base64 tool writes it
                {"image_url": "data:image/jpeg;base64," + base64.encodebytes(images[1]).decode()},
            ],
            "mask": {"image_url": data_url(mask)},
            "n": 2,
            "seed": 3,
            "size": "512x256",
            "input_fidelity": "high",
            "moderation": "low",
        },
    )
    assert response.status_code == 200, response.text
    assert predictor.requests[-1].url.path == "/v2/models/qwen-image-edit/infer"
    assert sent_images(predictor) == {contract.IMAGE: images, contract.MASK: [mask]}
    params = predictor.last_body["parameters"]
    assert (params[contract.WIDTH], params[contract.HEIGHT], params[contract.SEED]) == (512, 256, 3)
    assert [item["seed"] for item in response.json()["data"]] == [3, 4]


GIF_URL = data_url(b"GIF89a....", "image/gif")


@pytest.mark.parametrize(
    ("fields", "param", "code", "message"),
    [
        ({}, "images", "missing_required_parameter", "Missing required parameter: 'images'"),
        ({"images": []}, "images", "missing_required_parameter", None),
        (
            {"images": [{"image_url": "https://example.com/cat.png"}]},
            "images",
            "unsupported_value",
            "The image's image_url is not a data URL, and this server fetches no URLs: send "
            "the image itself as a base64 data URL ('data:image/png;base64,...')",
        ),
        (
            {"images": [{"file_id": "file-abc"}]},
            "images",
            "unsupported_value",
            "The image is given by file_id, and this server has no Files API: send the "
            "image itself as a base64 data URL ('data:image/png;base64,...') in image_url",
        ),
        (
            {"images": [{"image_url": GIF_URL, "file_id": "f"}]},
            "images",
            "invalid_value",
            "Invalid value for 'images[0]': give exactly one of 'image_url' and 'file_id'",
        ),
        ({"images": [{}]}, "images", "invalid_value", None),
        (
            {"images": [{"url": GIF_URL}]},
            "images",
            "unknown_parameter",
            "Unrecognized request argument supplied: images[0].url",
        ),
        (
            {"images": [{"image_url": "data:image/png,abc"}]},
            "images",
            "invalid_value",
            "The image's image_url is a data URL without ';base64': send the image itself as "
            "a base64 data URL ('data:image/png;base64,...')",
        ),
        (
            {"images": [{"image_url": "data:image/png;base64,iVBOR$$"}]},
            "images",
            "invalid_value",
            None,
        ),
        (
            {"images": [{"image_url": data_url(encode())}, {"image_url": GIF_URL}]},
            "images",
            "invalid_image_format",
            "Image 2 of 2 must be a PNG, JPEG or WebP file",
        ),
        ({"images": [{"image_url": data_url(encode())}] * 17}, "images", "invalid_value", None),
        (
            {"images": [{"image_url": data_url(b"\x89PNG\r\n\x1a\n" + bytes(30_000))}] * 2},
            "images",
            "image_too_large",
            "The images together are larger than 50000 bytes",
        ),
        (
            {
                "images": [{"image_url": data_url(encode())}],
                "mask": {"image_url": "HTTP://10.0.0.1/mask.png"},
            },
            "mask",
            "unsupported_value",
            None,
        ),
        (
            {"images": [{"image_url": data_url(encode())}], "mask": {"image_url": GIF_URL}},
            "mask",
            "invalid_image_format",
            "The mask must be a PNG or WebP file: its fully transparent pixels mark the area to "
            "edit, and a JPEG has no transparency",
        ),
        (
            {"images": [{"image_url": GIF_URL}], "mask": {"image_url": GIF_URL, "detail": "low"}},
            "mask",
            "unknown_parameter",
            "Unrecognized request argument supplied: mask.detail",
        ),
    ],
    ids=[
        "no-images",
        "empty-images",
        "an-https-url",
        "a-file-id",
        "url-and-file-id",
        "neither",
        "unknown-field",
        "not-base64",
        "bad-base64",
        "second-a-gif",
        "more-than-openai-allows",
        "too-large-together",
        "mask-an-http-url",
        "mask-a-gif",
        "mask-unknown-field",
    ],
)
def test_json_edit_errors(make_client, predictor, fields, param, code, message):
    client = make_client(max_upload_bytes=50_000)
    response = client.post("/v1/images/edits", json={"prompt": "x", **fields})
    error = assert_error(response, 400, code, param)
    if message is not None:
        assert error["message"] == message
    assert not predictor.requests


class ImageHost(http.server.BaseHTTPRequestHandler):
    """A web server's answers to image fetches: a PNG, a large file, a redirect, answers
    that start late (2 s) and a little late (0.4 s), one that trickles in, a gzip-encoded
    one, 404 for anything else. It records the paths asked for in ``asked``."""

    PNG = encode((96, 64))
    asked: list[str] = []
    resume = threading.Event()  # /stalled.png sends its second half once this is set

    def do_GET(self) -> None:
        self.asked.append(self.path)
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.end_headers()
            return
        if self.path == "/late.png":
            time.sleep(2)
        if self.path == "/slow.png":
            time.sleep(0.4)
        body = {
            "/cat.png": self.PNG,
            "/late.png": self.PNG,
            "/slow.png": self.PNG,
            "/trickle.png": self.PNG[:10],
            "/gzip.png": gzip.compress(self.PNG),
            "/big.png": b"\x89PNG\r\n\x1a\n" + bytes(200_000),
            "/stalled.png": b"\x89PNG\r\n\x1a\n" + bytes(400_000),
        }.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        if self.path == "/gzip.png":
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        with contextlib.suppress(ConnectionError):  # a client that gave up
            if self.path == "/trickle.png":  # each byte in time, the whole too late
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.2)
                return
            if self.path == "/stalled.png":
                self.wfile.write(body[:200_000])
                self.wfile.flush()
                self.resume.wait(10)
                body = body[200_000:]
            self.wfile.write(body or b"")

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def http_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """The base URL of a loopback web server answering with ``handler``, in a thread."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """The base URL of a loopback web server serving ``ImageHost``'s answers."""
    with http_server(ImageHost) as url:
        yield url


URL_READS = "qwen_image_adapter_image_urls_total"
URL_FETCH_TIMES = "qwen_image_adapter_image_url_fetch_duration_seconds_count"


def url_reads(outcome: str) -> float:
    """How many image URLs were read with ``outcome`` so far, in the adapter's metrics."""
    return REGISTRY.get_sample_value(URL_READS, {"outcome": outcome}) or 0


def test_image_urls_on_listed_hosts_are_fetched(make_client, predictor, image_host):
    client = make_client(image_url_hosts=["127.0.0.1"])
    mask = encode((96, 64))
    fetched, timed = url_reads("fetched"), REGISTRY.get_sample_value(URL_FETCH_TIMES) or 0
    response = client.post(
        "/v1/images/edits",
        json={
            "prompt": "a hat",
            "images": [{"image_url": f"{image_host}/cat.png"}, {"image_url": data_url(mask)}],
            "mask": {"image_url": f"{image_host}/cat.png"},
        },
    )
    assert response.status_code == 200, response.text
    png = ImageHost.PNG
    assert sent_images(predictor) == {contract.IMAGE: [png, mask], contract.MASK: [png]}
    # Two fetches, timed; the data URL is no fetch.
    assert url_reads("fetched") == fetched + 2
    assert REGISTRY.get_sample_value(URL_FETCH_TIMES) == timed + 2


FOR_ALL = ", the time for all of a request's image URLs (less if the request's own time ends first)"


@pytest.mark.parametrize(
    ("path", "code", "message", "outcome"),
    [
        ("/missing.png", "invalid_value", "could not be fetched: HTTP 404", "failed"),
        (
            "/moved",
            "invalid_value",
            "could not be fetched: HTTP 302 (redirects are not followed)",
            "failed",
        ),
        # Fetched up to the limit: the edit, not the fetch, is refused.
        ("/big.png", "image_too_large", "The image is larger than 50000 bytes", "fetched"),
        ("/late.png", "invalid_value", f"could not be fetched within 0.5 s{FOR_ALL}", "timed_out"),
        (
            "/trickle.png",
            "invalid_value",
            f"could not be fetched within 0.5 s{FOR_ALL}",
            "timed_out",
        ),
        (
            "/gzip.png",
            "invalid_value",
            "could not be fetched: the answer is gzip-encoded",
            "failed",
        ),
    ],
)
def test_image_url_fetch_errors(make_client, predictor, image_host, path, code, message, outcome):
    client = make_client(
        image_url_hosts=["127.0.0.1"], max_upload_bytes=50_000, image_url_timeout_seconds=0.5
    )
    body = {"prompt": "x", "images": [{"image_url": image_host + path}]}
    outcomes = ("fetched", "refused", "failed", "timed_out")
    before = {name: url_reads(name) for name in outcomes}
    started = time.monotonic()
    error = assert_error(client.post("/v1/images/edits", json=body), 400, code, "images")
    assert error["message"].endswith(message)
    assert time.monotonic() - started < 1.5, "the timeout bounds the whole fetch"
    assert not predictor.requests
    counted = {name: url_reads(name) - before[name] for name in outcomes}
    assert counted == {name: int(name == outcome) for name in outcomes}


def test_image_url_fetches_end_with_the_requests_time(make_client, predictor, image_host):
    """Fetches that their own limit (5 s) would allow stop when the request's time (1 s)
    runs out: the request ends within it, and no predictor is asked."""
    client = make_client(
        image_url_hosts=["127.0.0.1"], image_url_timeout_seconds=5, request_timeout_seconds=1
    )
    slow = [{"image_url": f"{image_host}/slow.png"}] * 5  # 0.4 s each
    started = time.monotonic()
    response = client.post("/v1/images/edits", json={"prompt": "x", "images": slow})
    error = assert_error(response, 400, "invalid_value", "images")
    assert error["message"].endswith(f"could not be fetched within 5 s{FOR_ALL}")
    assert time.monotonic() - started < 1.6
    assert not predictor.requests


def test_one_time_limit_bounds_all_image_url_fetches(make_client, predictor, image_host):
    """Five fetches of 0.4 s each, one after another, take 2 s: past the 1 s that the
    request's fetches get together, though each would fit."""
    client = make_client(image_url_hosts=["127.0.0.1"], image_url_timeout_seconds=1)
    one = {"prompt": "x", "images": [{"image_url": f"{image_host}/slow.png"}]}
    assert client.post("/v1/images/edits", json=one).status_code == 200
    started = time.monotonic()
    response = client.post("/v1/images/edits", json={**one, "images": one["images"] * 5})
    error = assert_error(response, 400, "invalid_value", "images")
    assert error["message"].endswith(f"could not be fetched within 1 s{FOR_ALL}")
    assert time.monotonic() - started < 1.8
    assert len(predictor.requests) == 1


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://localhost:{port}/cat.png", "is on 'localhost', a host"),
        ("http://images.example.com@127.0.0.1:{port}/cat.png", "is on '127.0.0.1', a host"),
        ("s3://images/cat.png", "is neither a data URL nor an http(s) URL"),
    ],
    ids=["unlisted-host", "userinfo", "s3"],
)
def test_image_urls_on_other_hosts_are_not_fetched(
    make_client, predictor, image_host, url, message
):
    client = make_client(image_url_hosts=["images.example.com", "*.example.com"])
    asked, refused = len(ImageHost.asked), url_reads("refused")
    url = url.format(port=image_host.rsplit(":", 1)[1])
    body = {"prompt": "x", "images": [{"image_url": url}]}
    error = assert_error(
        client.post("/v1/images/edits", json=body), 400, "unsupported_value", "images"
    )
    assert message in error["message"]
    assert len(ImageHost.asked) == asked and not predictor.requests
    assert url_reads("refused") == refused + 1


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://images.example.com:99999/cat.png", "port 99999"),
        ("http://images.example.com:-1/cat.png", "port -1"),
        ("http://xn--zz.example.com/cat.png", "Invalid A-label"),
        ("http://[::1/cat.png", "Invalid port"),
    ],
    ids=["port-too-large", "port-negative", "bad-idna", "bad-ipv6"],
)
def test_image_urls_that_no_request_can_be_made_of_are_a_400(make_client, predictor, url, reason):
    client = make_client(image_url_hosts=["images.example.com", "*.example.com"])
    failed = url_reads("failed")
    body = {"prompt": "x", "images": [{"image_url": url}]}
    error = assert_error(client.post("/v1/images/edits", json=body), 400, "invalid_value", "images")
    assert "image_url is not a valid URL (" in error["message"]
    assert reason in error["message"]
    assert url_reads("failed") == failed + 1 and not predictor.requests


def test_an_unsupported_value_is_refused_before_any_fetch(make_client, predictor, image_host):
    client = make_client(image_url_hosts=["127.0.0.1"])
    asked = len(ImageHost.asked)
    body = {"prompt": "x", "images": [{"image_url": f"{image_host}/cat.png"}]}
    response = client.post("/v1/images/edits", json={**body, "background": "transparent"})
    assert_error(response, 400, "unsupported_value", "background")
    assert len(ImageHost.asked) == asked and not predictor.requests


def test_listed_image_hosts():
    listed = Settings(image_url_hosts=["*.example.com", "Images.Test"]).image_url_hosts
    allowed = ["a.example.com", "b.a.example.com", "images.test", "IMAGES.test"]
    refused = ["example.com", "evil-example.com", "example.com.evil", "x.images.test"]
    assert [host_allowed(host, listed) for host in allowed + refused] == [True] * 4 + [False] * 4
    for entry in (
        "https://images.example.com",
        "images.example.com:8080",
        "*",
        "[::1]",
        "images.example.com\n",
    ):
        with pytest.raises(ValueError, match="is not a host name"):
            Settings(image_url_hosts=[entry])


def test_a_json_edit_as_large_as_the_upload_limit_fits_in_a_body(make_client, predictor):
    """A data URL is a third larger than its image: the body limit leaves room for that."""
    client = make_client(max_upload_bytes=6_000_000)
    image = b"\x89PNG\r\n\x1a\n" + bytes(6_000_000 - 8)
    body = {"prompt": "x", "images": [{"image_url": data_url(image)}]}
    assert len(json.dumps(body)) > 6_000_000 + 1024 * 1024
    response = client.post("/v1/images/edits", json=body)
    assert response.status_code == 200, response.text
    assert sent_images(predictor)[contract.IMAGE] == [image]
    body["images"][0]["image_url"] = data_url(image + b"\x00")
    assert_error(client.post("/v1/images/edits", json=body), 400, "image_too_large", "images")


def test_a_form_field_sent_twice_gives_its_last_value(client, predictor):
    """As FastAPI reads forms: the last value wins, except for the images, which add up."""
    first, second, mask = encode((64, 64)), encode((96, 64)), encode((64, 64))
    response = client.post(
        "/v1/images/edits",
        data={"prompt": ["a hat", "a scarf"], "seed": ["1", "2"]},
        files=[
            ("image", ("a.png", first, "image/png")),
            ("image", ("b.png", second, "image/png")),
            ("mask", ("m1.png", encode((32, 32)), "image/png")),
            ("mask", ("m2.png", mask, "image/png")),
        ],
    )
    assert response.status_code == 200, response.text
    assert sent_images(predictor) == {contract.IMAGE: [first, second], contract.MASK: [mask]}
    inputs = {item["name"]: item["data"] for item in predictor.last_body["inputs"]}
    assert inputs[contract.PROMPT] == ["a scarf"]
    assert predictor.last_body["parameters"][contract.SEED] == 2


def test_blank_form_fields_count_as_not_sent(client: TestClient, predictor: FakePredictor):
    """As browsers send them: an empty text field, a file input with no file chosen."""
    image = ("image", ("upload", encode(), "image/png"))
    no_file = ("mask", ("", b"", "application/octet-stream"))
    response = client.post(
        "/v1/images/edits", data={"prompt": "x", "size": "", "seed": ""}, files=[image, no_file]
    )
    assert response.status_code == 200, response.text
    assert contract.MASK not in sent_images(predictor)
    assert contract.WIDTH not in predictor.last_body["parameters"]
    assert contract.SEED not in predictor.last_body["parameters"]
    response = client.post("/v1/images/edits", data={"prompt": "x"}, files=[no_file])
    assert_error(response, 400, "missing_required_parameter", "image")


def test_a_body_past_the_upload_limit_is_refused_before_it_is_read(make_client, predictor):
    client = make_client(max_upload_bytes=50_000)
    oversized = b"\x89PNG\r\n\x1a\n" + bytes(2 * 1024 * 1024)
    parts = [("image", ("upload", oversized, "application/octet-stream"))]
    response = client.post("/v1/images/edits", data={"prompt": "x"}, files=parts)
    assert_error(response, 413, "request_too_large", None)
    assert response.headers["x-request-id"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused while it streams
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    streamed = client.post(
        "/v1/images/generations", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error(streamed, 413, "request_too_large", None)
    assert not predictor.requests


def test_a_generation_body_has_a_limit_of_its_own(client, predictor):
    """A generation carries text only: past ``GENERATION_MAX_BODY_BYTES`` it is refused,
    by its Content-Length or as it streams, while edits keep the upload limit's room. Both
    prompts at their longest fit, even with every character JSON-escaped."""
    escaped = "\\ud83d\\ude00" * contract.MAX_PROMPT_CHARACTERS  # an emoji, 12 bytes as JSON
    body = f'{{"prompt": "{escaped}", "negative_prompt": "{escaped}"}}'.encode()
    headers = {"content-type": "application/json"}
    response = client.post("/v1/images/generations", content=body, headers=headers)
    assert response.status_code == 200, response.text
    oversized = b'{"prompt": "' + b"x" * GENERATION_MAX_BODY_BYTES + b'"}'
    response = client.post("/v1/images/generations", content=oversized, headers=headers)
    error = assert_error(response, 413, "request_too_large", None)
    assert error["message"] == f"The request body is larger than {GENERATION_MAX_BODY_BYTES} bytes"
    streamed = client.post(
        "/v1/images/generations", content=iter([oversized[:-2], b'"}']), headers=headers
    )
    assert_error(streamed, 413, "request_too_large", None)
    image = b"\x89PNG\r\n\x1a\n" + bytes(2 * GENERATION_MAX_BODY_BYTES)
    response = client.post(
        "/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", image, "image/png")}
    )
    assert response.status_code == 200, response.text
    assert len(predictor.requests) == 2


class SlowPredictor:
    """A predictor that answers once ``release`` is set; ``arrived`` gets an item as each
    call arrives."""

    def __init__(self) -> None:
        self.arrived: asyncio.Queue[None] = asyncio.Queue()
        self.release = asyncio.Event()

    async def answer(self, request: httpx.Request) -> httpx.Response:
        self.arrived.put_nowait(None)
        await self.release.wait()
        return v2_answer(request)


def test_edits_hold_at_most_the_upload_budget_at_once():
    """While edits wait for the predictor, another one that would take the bodies held past
    ``QWEN_ADAPTER_MAX_UPLOAD_BYTES_IN_FLIGHT`` gets a retryable 503 before it is read; one
    that fits goes on, and the room comes back as edits finish."""
    slow_predictor = SlowPredictor()
    app = create_app(
        Settings(max_upload_bytes_in_flight=300_000, retry_after_seconds=7),
        transport=httpx.MockTransport(slow_predictor.answer),
    )
    large = b"\x89PNG\r\n\x1a\n" + bytes(200_000)

    def edit(http: httpx.AsyncClient, image: bytes) -> Awaitable[httpx.Response]:
        files = {"image": ("a.png", image, "image/png")}
        return http.post("/v1/images/edits", data={"prompt": "x"}, files=files)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://adapter") as http,
        ):
            first = asyncio.create_task(edit(http, large))
            await asyncio.wait_for(slow_predictor.arrived.get(), 5)
            busy_labels = {"route": "/v1/images/edits", "method": "POST", "status": "503"}
            busy_before = REGISTRY.get_sample_value(COUNTED, busy_labels) or 0
            refused = await asyncio.wait_for(edit(http, large), 5)
            error = assert_error(refused, 503, "server_busy", None)
            # Counted under the edit route, as the dashboard's panels select it.
            assert REGISTRY.get_sample_value(COUNTED, busy_labels) == busy_before + 1
            assert "busy receiving other uploads" in error["message"]
            assert refused.headers["retry-after"] == "7"
            small = asyncio.create_task(edit(http, encode()))
            await asyncio.wait_for(slow_predictor.arrived.get(), 5)  # fits beside the first
            slow_predictor.release.set()
            assert (await first).status_code == 200 and (await small).status_code == 200
            assert (await edit(http, large)).status_code == 200  # the room came back

    asyncio.run(scenario())


def test_images_fetched_from_urls_count_against_the_upload_budget(image_host):
    """A JSON edit of a few bytes may fetch megabytes: what it fetches is held, until it
    ends, against ``QWEN_ADAPTER_MAX_UPLOAD_BYTES_IN_FLIGHT`` as an uploaded file is."""
    slow_predictor = SlowPredictor()
    app = create_app(
        Settings(
            max_upload_bytes_in_flight=300_000,
            retry_after_seconds=7,
            image_url_hosts=["127.0.0.1"],
        ),
        transport=httpx.MockTransport(slow_predictor.answer),
    )
    body = {"prompt": "x", "images": [{"image_url": f"{image_host}/big.png"}]}  # 200 kB

    async def scenario() -> None:
        transport = httpx.ASGITransport(app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://adapter") as http,
        ):
            first = asyncio.create_task(http.post("/v1/images/edits", json=body))
            await asyncio.wait_for(slow_predictor.arrived.get(), 5)
            refused = await asyncio.wait_for(http.post("/v1/images/edits", json=body), 5)
            error = assert_error(refused, 503, "server_busy", None)
            assert "busy receiving other uploads" in error["message"]
            assert refused.headers["retry-after"] == "7"
            # Counted as they arrive: refused halfway through its fetch, not at its end.
            stalled = {"prompt": "x", "images": [{"image_url": f"{image_host}/stalled.png"}]}
            ImageHost.resume.clear()
            try:
                halfway = await asyncio.wait_for(http.post("/v1/images/edits", json=stalled), 5)
                assert not ImageHost.resume.is_set()
                assert_error(halfway, 503, "server_busy", None)
            finally:
                ImageHost.resume.set()
            slow_predictor.release.set()
            assert (await first).status_code == 200
            # The room came back: the fetched bytes were let go with the first edit.
            assert (await http.post("/v1/images/edits", json=body)).status_code == 200

    asyncio.run(scenario())


def test_an_edit_alone_fits_whatever_the_upload_budget(make_client, predictor):
    client = make_client(max_upload_bytes_in_flight=1000)
    image = b"\x89PNG\r\n\x1a\n" + bytes(200_000)
    files = {"image": ("a.png", image, "image/png")}
    response = client.post("/v1/images/edits", data={"prompt": "x"}, files=files)
    assert response.status_code == 200, response.text


APP_ORIGIN = "https://app.example.com"


def test_cors_for_listed_origins(make_client, predictor):
    """Browser pages of a listed origin may call the API: the preflight is answered before
    the API key is asked for, and answers (errors included) expose the request id."""
    client = make_client(cors_origins=[APP_ORIGIN], api_key="s3cret", max_upload_bytes=1000)
    preflight = client.options(
        "/v1/images/generations",
        headers={
            "Origin": APP_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-lang",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-stainless-lang" in preflight.headers["access-control-allow-headers"].lower()
    key = {"Authorization": "Bearer s3cret"}
    answer = client.post(
        "/v1/images/generations", json={"prompt": "x"}, headers={"Origin": APP_ORIGIN, **key}
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()
    too_large = client.post(
        "/v1/images/generations",
        content=b"x" * 2_000_000,
        headers={"Origin": APP_ORIGIN, "content-type": "application/json", **key},
    )
    assert too_large.status_code == 413
    assert too_large.headers["access-control-allow-origin"] == APP_ORIGIN
    other = client.post(
        "/v1/images/generations",
        json={"prompt": "x"},
        headers={"Origin": "https://elsewhere.example", **key},
    )
    assert "access-control-allow-origin" not in other.headers


def test_no_cors_headers_by_default(client: TestClient):
    headers = {"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST"}
    preflight = client.options("/v1/images/generations", headers=headers)
    assert preflight.status_code == 405
    answer = client.post("/v1/images/generations", json={"prompt": "x"}, headers=headers)
    assert answer.status_code == 200
    assert not [name for name in answer.headers if name.startswith("access-control-")]


def test_api_key(make_client: Callable[..., TestClient]):
    client = make_client(api_key="s3cret")
    for headers in ({}, {"Authorization": "Basic dXNlcjpzM2NyZXQ="}):
        error = assert_error(
            client.get("/v1/models", headers=headers), 401, "invalid_api_key", None
        )
        assert error["message"] == "No API key in an 'Authorization: Bearer <key>' header"
    wrong = {"Authorization": "Bearer nope"}
    assert_error(client.get("/v1/models", headers=wrong), 401, "invalid_api_key", None)
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).is_success
    assert client.get("/health/live").is_success


@pytest.mark.parametrize(
    ("path", "content", "content_type"),
    [
        ("/v1/images/generations", b"{oops", "application/json"),
        ("/v1/images/generations", b'{"prompt": ""}', "application/json"),
        ("/v1/images/generations", b"prompt=x", "text/plain"),
        ("/v1/images/edits", b"{oops", "application/json"),
        ("/v1/images/edits", b"prompt=x", "multipart/form-data"),
    ],
)
def test_the_api_key_is_checked_before_the_body(
    make_client, predictor, path, content, content_type
):
    """A client without the key learns nothing from the body's problems: 401, not 400."""
    client = make_client(api_key="s3cret")
    response = client.post(path, content=content, headers={"content-type": content_type})
    assert_error(response, 401, "invalid_api_key", None)
    assert not predictor.requests


def test_several_api_keys(make_client: Callable[..., TestClient]):
    """Keys rotate without downtime: while both are listed, the old and the new one work."""
    client = make_client(api_key=" old-key , new-key ")
    for key in ("old-key", "new-key"):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).is_success
    for wrong in ("old-key , new-key", "old-key,new-key", "", "other"):
        response = client.get("/v1/models", headers={"Authorization": f"Bearer {wrong}"})
        assert_error(response, 401, "invalid_api_key", None)
    for blank in ("", " , "):
        with pytest.raises(ValueError, match="holds no key"):
            Settings(api_key=blank)


def test_http_errors_have_openai_shape(client: TestClient):
    assert_error(client.get("/v1/nothing"), 404, "not_found", None)
    assert_error(client.delete("/v1/models"), 405, "method_not_allowed", None)
    assert_error(client.get("/v1/images/generations"), 405, "method_not_allowed", None)


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK's, for dall-e-2
def test_image_variations_are_refused_with_what_to_use_instead(client: TestClient):
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.images.create_variation(image=encode(), n=1, size="256x256")
    error = caught.value.body
    assert (error["code"], error["param"]) == ("not_found", None)
    assert error["message"] == (
        "Not Found: POST /v1/images/variations: image variations (dall-e-2's) are not offered "
        "here; to change an image, edit it with a prompt (/v1/images/edits)"
    )


def test_unexpected_exception_is_a_500(make_client, predictor, caplog):
    """An unexpected error is a 500 in OpenAI's shape, logged once with its traceback, and
    it carries the CORS headers, so a browser page sees the 500 and not a network error."""

    def explode(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("bug")

    predictor.handler = explode
    client = make_client(cors_origins=[APP_ORIGIN])  # raises what escapes the app
    with caplog.at_level(logging.ERROR):
        response = client.post(
            "/v1/images/generations",
            json={"prompt": "x"},
            headers={"x-request-id": "r1", "Origin": APP_ORIGIN},
        )
    assert_error(response, 500, "internal_error", None)
    assert response.headers["x-request-id"] == "r1"
    assert response.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-should-retry" not in response.headers  # the SDK may retry it
    logged = [record for record in caplog.records if record.exc_info]
    assert [record.getMessage() for record in logged] == ["request_id=r1 unexpected error"]
    assert logged[0].exc_info[0] is RuntimeError


def test_a_fault_outside_the_error_middleware_is_still_an_openai_500(monkeypatch, predictor):
    """A middleware outside ``UnexpectedErrorMiddleware`` that fails (here the access
    middleware, on its in-progress gauge) still gets a 500 in OpenAI's shape."""

    def broken() -> None:
        raise RuntimeError("gauge broken")

    monkeypatch.setattr(adapter_metrics.IN_PROGRESS, "inc", broken)
    app = create_app(Settings(), transport=httpx.MockTransport(predictor))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/v1/models")
    assert_error(response, 500, "internal_error", None)


def test_health(client: TestClient, predictor: FakePredictor):
    predictor.handler = lambda request: httpx.Response(200)
    assert client.get("/health/live").json() == {"status": "alive"}
    assert client.get("/health/ready").json()["models"] == ["qwen-image", "qwen-image-edit"]
    paths = {request.url.path for request in predictor.requests}
    assert paths == {"/v2/models/qwen-image/ready", "/v2/models/qwen-image-edit/ready"}
    predictor.handler = lambda request: httpx.Response(503 if "edit" in request.url.path else 200)
    error = assert_error(client.get("/health/ready"), 503, "not_ready", None)
    assert "qwen-image-edit" in error["message"]


def test_openapi_documents_openai_errors_only(client: TestClient):
    schema = client.get("/openapi.json").json()
    for path in ("/v1/images/generations", "/v1/images/edits", "/v1/models"):
        assert path in schema["paths"]
    for path in ("/v1/images/generations", "/v1/images/edits"):
        assert {"400", "401", "413", "503", "504"} <= set(
            schema["paths"][path]["post"]["responses"]
        )
    text = json.dumps(schema)
    assert '"422"' not in text and "HTTPValidationError" not in text
    assert "image[]" in text
    edit_body = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert set(edit_body) == {"multipart/form-data", "application/json"}
    generation_body = schema["paths"]["/v1/images/generations"]["post"]["requestBody"]
    assert generation_body["required"] is True
    generation_ref = generation_body["content"]["application/json"]["schema"]["$ref"]
    components = schema["components"]["schemas"]
    generation = components[generation_ref.rsplit("/", 1)[1]]
    assert generation["required"] == ["prompt"] and "style" in generation["properties"]
    for path in ("/v1/images/generations", "/v1/images/edits"):
        answers = schema["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(answers) == {"application/json", "text/event-stream"}
        events = [ref["$ref"] for ref in answers["text/event-stream"]["schema"]["oneOf"]]
        assert [ref.rsplit("/", 1)[1] for ref in events] == [
            "ImagePartialEvent",
            "ImageCompletedEvent",
            "StreamErrorEvent",
        ]
    for refs in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text):
        assert refs in components
    json_edit = components[edit_body["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert "images" in json_edit["required"]
    assert components["ImageReference"]["properties"].keys() == {"image_url", "file_id"}
    assert client.get("/docs").status_code == 200


def test_with_every_connection_busy_ready_answers_and_a_request_is_shed():
    """Generations holding every connection to their predictor neither make /health/ready
    fail (it has connections of its own), nor take the edit predictor's connections (each
    predictor has its pool), nor make another generation wait for a connection for longer
    than the connect timeout: it gets a 503 with Retry-After, as from a busy predictor."""

    async def scenario() -> dict[str, httpx.Response | float]:
        generating, release = asyncio.Event(), asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
            body = await reader.readexactly(int(length[1])) if length else b""
            answer = httpx.Response(200)
            if b"/v2/models/qwen-image/infer " in head:
                generating.set()
                await release.wait()
            elif b"/infer " in head:
                answer = v2_answer(httpx.Request("POST", "http://predictor", content=body))
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(answer.content), answer.content)
            )
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        settings = Settings(
            generation_url=url,
            edit_url=url,
            max_connections=1,
            ready_timeout_seconds=1,
            connect_timeout_seconds=2,  # shed after it; a loaded CI machine connects slowly
        )
        app = create_app(settings)
        transport = httpx.ASGITransport(app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://adapter") as http,
        ):
            generation = asyncio.create_task(
                http.post("/v1/images/generations", json={"prompt": "x"})
            )
            await asyncio.wait_for(generating.wait(), 10)
            try:
                answers: dict[str, httpx.Response | float] = {}
                answers["ready"] = await http.get("/health/ready")
                answers["edit"] = await http.post(
                    "/v1/images/edits", data={"prompt": "hat"}, files={"image": encode()}
                )
                started = time.perf_counter()
                answers["shed"] = await http.post("/v1/images/generations", json={"prompt": "y"})
                answers["seconds"] = time.perf_counter() - started
                return answers
            finally:
                release.set()
                await generation
                server.close()

    answers = asyncio.run(scenario())
    assert answers["ready"].status_code == 200, answers["ready"].text
    assert answers["edit"].status_code == 200, answers["edit"].text
    assert_error(answers["shed"], 503, "predictor_unavailable", None)
    assert answers["shed"].headers["retry-after"] == RETRY_LATER["retry-after"]
    assert answers["seconds"] < 5, f"waited {answers['seconds']:.1f} s for a connection"


COUNTED = "qwen_image_adapter_requests_total"


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """A sample of the adapter's /metrics (0 when absent)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_metrics_count_requests_by_route_and_status(make_client, predictor):
    client = make_client(max_upload_bytes=1000)
    generations = "/v1/images/generations"
    requests: list[tuple[str, str, dict[str, Any], str, str]] = [
        # method, path, request fields, route label, status
        ("POST", generations, {"json": {"prompt": "x"}}, generations, "200"),
        ("POST", generations, {"json": {}}, generations, "400"),
        ("GET", "/v1/models/nope", {}, "/v1/models/{model_id:path}", "404"),
        ("GET", "/v1/nope", {}, "unrouted", "404"),
        # refused by its Content-Length before routing: still its route's
        ("POST", "/v1/images/edits", {"content": bytes(2_000_000)}, "/v1/images/edits", "413"),
        ("POST", "/v1/models", {"content": bytes(2_000_000)}, "unrouted", "413"),
        ("BREW", "/v1/coffee", {}, "unrouted", "404"),
    ]
    timed = "qwen_image_adapter_request_duration_seconds_count"

    def counts() -> list[float]:
        """Each request's count; a method that is not standard is counted as 'other'."""
        return [
            metric(
                client, COUNTED, route=route, method=method.replace("BREW", "other"), status=code
            )
            for method, _, _, route, code in requests
        ]

    before = counts()
    timed_before = metric(client, timed, route=generations, method="POST")
    for method, path, fields, _, status in requests:
        assert str(client.request(method, path, **fields).status_code) == status
    assert [a - b for a, b in zip(counts(), before, strict=True)] == [1] * len(requests)
    assert metric(client, timed, route=generations, method="POST") - timed_before == 2
    # API requests only: the scrapes (and health checks) would keep it from ever reading 0
    assert metric(client, "qwen_image_adapter_requests_in_progress") == 0
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def raw_connection(url: str, timeout: float) -> socket.socket:
    """A plain TCP connection to the server at ``url`` (on loopback), for requests an HTTP
    client would not send: bodies that stall, trickle or break off."""
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    sock.settimeout(timeout)
    return sock


def access_line(caplog: pytest.LogCaptureFixture, request_id: str) -> str:
    """The access log line of the request ``request_id``, once the server has logged it."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for record in list(caplog.records):
            message = record.getMessage()
            if record.name == "openai_adapter.access" and f"request_id={request_id} " in message:
                return message
        time.sleep(0.05)
    raise AssertionError(f"no access log line for {request_id}")


FORM_HEAD = (
    b'--x\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na hat\r\n'
    b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\x89PNG'
)


@pytest.mark.parametrize(
    ("path", "content_type", "sent"),
    [
        ("/v1/images/edits", "multipart/form-data; boundary=x", FORM_HEAD),
        ("/v1/images/edits", "application/json", b'{"prompt": "a hat", "images": ['),
        ("/v1/images/generations", "application/json", b'{"prompt": "a cat"'),
    ],
    ids=["form-edit", "json-edit", "generation"],
)
def test_a_client_that_leaves_during_its_upload_is_a_499(
    caplog, predictor, path, content_type, sent
):
    """A client that closes its connection with its body half sent is counted and logged
    as one that leaves later is: 499, with no error logged and no 400 or 500 counted."""
    caplog.set_level(logging.INFO, logger="openai_adapter")
    statuses = ("499", "400", "500")
    labels = {"route": path, "method": "POST"}
    app = create_app(Settings(), transport=httpx.MockTransport(predictor))
    with uvicorn_server(app) as url, httpx.Client(base_url=url) as http:
        before = [metric(http, COUNTED, **labels, status=status) for status in statuses]
        head = (
            f"POST {path} HTTP/1.1\r\nHost: adapter\r\nContent-Type: {content_type}\r\n"
            "Content-Length: 100000\r\nx-request-id: left-early\r\n\r\n"
        )
        with raw_connection(url, 5) as sock:
            sock.sendall(head.encode() + sent)
            time.sleep(0.3)  # the adapter reads what came, and waits for the rest
        line = access_line(caplog, "left-early")
        after = [metric(http, COUNTED, **labels, status=status) for status in statuses]
    assert line.startswith(f"request_id=left-early POST {path} 499 "), line
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 0, 0]
    problems = [record.getMessage() for record in caplog.records if record.levelno > logging.INFO]
    assert not problems
    assert not predictor.requests


def test_the_access_log_shows_the_path_as_sent(caplog, predictor):
    """Percent escapes stay escaped, and any other control or non-ASCII character is
    escaped: a client cannot forge or break log lines."""
    caplog.set_level(logging.INFO, logger="openai_adapter")
    app = create_app(Settings(), transport=httpx.MockTransport(predictor))
    with uvicorn_server(app) as url:
        forged = "/v1/models%0A2030-01-01 00:00:00,000 INFO openai_adapter.access: forged"
        response = httpx.get(url + forged, headers={"x-request-id": "forger"})
        assert response.status_code == 404
        line = access_line(caplog, "forger")
    assert line.startswith(
        "request_id=forger GET /v1/models%0A2030-01-01%2000:00:00,000%20INFO%20"
        "openai_adapter.access:%20forged 404 "
    ), line
    # Bytes that a lenient HTTP parser passes on, and a server that sends no raw_path.
    assert loggable_path({"path": "", "raw_path": b"/a\x1b[2J\xff\\b"}) == r"/a\x1b[2J\xff\\b"
    assert loggable_path({"path": "/caf\u00e9\n"}) == r"/caf\xc3\xa9\n"  # UTF-8


class LoopbackPredictor(http.server.BaseHTTPRequestHandler):
    """A predictor: ready, and answering v2 infer calls as ``v2_answer``."""

    def do_GET(self) -> None:
        self.answer(httpx.Response(200))

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.answer(v2_answer(httpx.Request("POST", "http://predictor", content=body)))

    def answer(self, response: httpx.Response) -> None:
        self.send_response(response.status_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(response.content)))
        self.end_headers()
        self.wfile.write(response.content)

    def log_message(self, *args: Any) -> None:
        pass


class Proxy(LoopbackPredictor):
    """An HTTP proxy that can reach only ``ImageHost``'s PNG (any URL ending in .png), and
    answers 502 otherwise. It records the URLs asked for in ``asked``."""

    asked: list[str] = []

    def do_GET(self) -> None:
        self.asked.append(self.path)
        if self.path.endswith(".png"):
            self.answer(httpx.Response(200, content=ImageHost.PNG))
        else:
            self.answer(httpx.Response(502))

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.do_GET()


def test_predictors_are_reached_directly_and_image_urls_through_the_proxy(monkeypatch):
    """``HTTP_PROXY``, set for the image URL fetches, does not send the v2 calls and the
    readiness checks to the proxy, which may not reach the predictors."""
    for name in ("http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    Proxy.asked.clear()
    with http_server(LoopbackPredictor) as predictor_url, http_server(Proxy) as proxy_url:
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        settings = Settings(
            generation_url=predictor_url,
            edit_url=predictor_url,
            image_url_hosts=["images.example.com"],
        )
        with TestClient(create_app(settings)) as client:
            ready = client.get("/health/ready")
            generated = client.post("/v1/images/generations", json={"prompt": "x"})
            image = {"image_url": "http://images.example.com/cat.png"}
            edited = client.post("/v1/images/edits", json={"prompt": "x", "images": [image]})
    for response in (ready, generated, edited):
        assert response.status_code == 200, response.text
    assert Proxy.asked == ["http://images.example.com/cat.png"]


def test_the_request_timeout_is_below_the_sdks():
    """A client that gives up first never sees the 504, and the SDK resends the request
    while the GPU still runs it."""
    default = Settings.model_fields["request_timeout_seconds"].default
    assert default <= openai.DEFAULT_TIMEOUT.read - 30


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),
        ("::1", "http://[::1]:8000"),
        ("localhost", "http://localhost:8000"),
    ],
)
def test_the_stack_reaches_the_adapter_on_any_host(host: str, url: str):
    assert adapter_url(host, 8000) == url


def test_protocol_formats_match_the_contract():
    assert set(get_args(OutputFormat)) == set(contract.OUTPUT_FORMATS)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_detect_image_format(fmt: str):
    assert detect_image_format(encode(fmt=fmt)) == fmt.lower()
    assert detect_image_format(b"RIFF0000WAVE") is None


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("QWEN_ADAPTER_GENERATION_URL", "http://gen:8080/")
    monkeypatch.setenv("QWEN_ADAPTER_EDIT_URL", "")
    monkeypatch.setenv("QWEN_ADAPTER_REQUEST_TIMEOUT_SECONDS", "30")
    settings = Settings()
    assert settings.predictor_url("qwen-image") == "http://gen:8080"
    assert settings.models == ["qwen-image"]
    assert settings.request_timeout_seconds == 30


def test_adapter_does_not_import_torch():
    """The adapter's image has no torch: nothing it imports may pull it in."""
    code = (
        "import sys, openai_adapter.__main__, openai_adapter.local_stack; "
        "print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def run_memory_benchmark(*args: str) -> str:
    """The output of ``bench/adapter_memory.py`` with ``args``; it must succeed."""
    bench = subprocess.Popen(
        [sys.executable, "bench/adapter_memory.py", *args],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its adapter and predictor processes go with it on a timeout
    )
    try:
        stdout, stderr = bench.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bench.pid, signal.SIGKILL)
    assert bench.returncode == 0, stderr
    return stdout


def test_memory_benchmark_shows_the_files_dropped_while_the_predictor_works():
    """``bench/adapter_memory.py`` end to end, at a small upload. While the predictor works,
    an edit holds its images' base64 only (multipart: 1.33x the body; JSON: 1.0x), not the
    files beside it (those Starlette spooled to disk, or, up to 1 MiB each, kept in memory),
    a JSON edit's data URLs (2.00x) or a second copy of the JSON sent on (3.67x before)."""
    stdout = run_memory_benchmark("--upload-mib", "4", "--repeats", "1")
    rows = {
        words[0]: [float(word) for word in words[1:]]
        for words in map(str.split, stdout.splitlines())
        if words and words[0] in ("multipart", "multipart16", "json")
    }
    assert set(rows) == {"multipart", "multipart16", "json"}, stdout
    for _, peak_mib, _, held_mib, _ in rows.values():
        assert 0 < held_mib <= peak_mib, stdout
    for shape in ("multipart", "multipart16", "json"):
        held_per_body_byte = rows[shape][4]
        assert held_per_body_byte < 1.5, stdout


def test_memory_benchmark_burst_reports_answers_and_peak_memory():
    stdout = run_memory_benchmark("--upload-mib", "1", "--burst", "3", "--hold", "0.5")
    match = re.search(
        r"answers \{200: 3\}; adapter peak RSS (\d+) MiB before, (\d+) MiB after", stdout
    )
    assert match, stdout
    assert 0 < int(match[1]) <= int(match[2]), stdout


def test_the_adapter_keeps_nothing_of_an_answer_once_it_is_sent():
    """``bench/adapter_memory.py --answer-images``, the garbage collector off in the adapter.
    An answer read with httpx's ``aread`` stayed on its response, which refers to its stream
    and back, until a full collection: 1.00x the images after each generation, hundreds of
    MB for ten large images. The JSON was also serialized to a str and encoded once more
    (peak 5.00x the images, now 2.67x)."""
    stdout = run_memory_benchmark(
        "--answer-images", "4", "--answer-mib", "2", "--hold", "0", "--repeats", "1"
    )
    rows = {
        words[0]: float(words[2])
        for words in map(str.split, stdout.splitlines())
        if words and words[0] in ("body", "peak", "held")
    }
    assert set(rows) == {"body", "peak", "held"}, stdout
    assert rows["body"] == pytest.approx(4 / 3, abs=0.01), stdout  # the images' base64
    assert rows["held"] < 0.05, stdout
    assert rows["body"] < rows["peak"] < 3.0, stdout


def test_the_adapter_does_not_log_the_urls_it_fetches_but_at_debug_level():
    """httpx logs each call's whole URL, and an image URL may carry credentials (a presigned
    URL's signature): its lines are left out but at debug level."""
    httpx_logger = logging.getLogger("httpx")
    level = httpx_logger.level
    try:
        configure_logging("info")
        assert httpx_logger.level == logging.WARNING
        httpx_logger.setLevel(logging.NOTSET)
        configure_logging("debug")
        assert httpx_logger.level == logging.NOTSET  # the root logger's debug level
    finally:
        httpx_logger.setLevel(level)


def send_body_slowly(url: str, path: str, body: bytes, chunk: int, pause: float) -> str:
    """POST ``body`` to the adapter at ``url``, ``chunk`` bytes every ``pause`` seconds, over
    a raw socket; the answer's text (the sending stops at a refusal)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: adapter\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nx-request-id: slow\r\nConnection: close\r\n\r\n"
    )
    with raw_connection(url, 10) as sock:
        sock.sendall(head.encode())
        with contextlib.suppress(OSError):  # refused meanwhile: the socket closed under us
            for start in range(0, len(body), chunk):
                sock.sendall(body[start : start + chunk])
                time.sleep(pause)
        answer = b""
        while part := sock.recv(65536):
            answer += part
    return answer.decode()


@pytest.mark.parametrize(
    ("limits", "prompt_bytes", "chunk", "refusal", "waited_range"),
    [
        # Bytes every 0.1 s never trip the 0.5 s idle timeout, but at 500 bytes a second the
        # body falls behind its deadline (0.5 s + 1 s per 1000 bytes received): about 1 s in.
        (
            {"body_idle_timeout_seconds": 0.5, "body_min_rate_bytes_per_second": 1000},
            20_000,  # 40 s at that pace
            50,
            "The request body arrived slower than 1000 bytes a second",
            (0.8, 4),
        ),
        # Faster than the minimum rate, but not in the request's time: a request, its upload
        # included, ends within its timeout, which the pod's grace period is sized by.
        (
            {
                "request_timeout_seconds": 1.0,
                "body_idle_timeout_seconds": 0.5,
                "body_min_rate_bytes_per_second": 100,
            },
            4000,  # 2 s at 2000 bytes a second
            200,
            "The request body did not arrive within the request's 1 s",
            (0.9, 1.8),
        ),
    ],
    ids=["slower-than-the-minimum-rate", "past-the-requests-deadline"],
)
def test_a_body_arriving_too_slowly_gets_a_408(
    caplog, predictor, limits, prompt_bytes, chunk, refusal, waited_range
):
    caplog.set_level(logging.INFO, logger="openai_adapter")
    app = create_app(Settings(**limits), transport=httpx.MockTransport(predictor))
    body = json.dumps({"prompt": "x" * prompt_bytes}).encode()
    with uvicorn_server(app) as url:
        started = time.monotonic()
        answer = send_body_slowly(url, "/v1/images/generations", body, chunk=chunk, pause=0.1)
        waited = time.monotonic() - started
    assert answer.startswith("HTTP/1.1 408 "), answer
    assert refusal in answer
    assert '"code":"request_timeout"' in answer
    assert waited_range[0] < waited < waited_range[1]
    assert access_line(caplog, "slow").startswith("request_id=slow POST /v1/images/generations 408")
    assert not predictor.requests


def test_a_body_slow_but_faster_than_the_minimum_rate_is_served(predictor):
    """Longer than the idle timeout in all, at 5000 bytes a second against a minimum of 1000."""
    settings = Settings(body_idle_timeout_seconds=0.5, body_min_rate_bytes_per_second=1000)
    app = create_app(settings, transport=httpx.MockTransport(predictor))
    body = json.dumps({"prompt": "a slow upload " + "x" * 6000}).encode()
    with uvicorn_server(app) as url:
        started = time.monotonic()
        answer = send_body_slowly(url, "/v1/images/generations", body, chunk=500, pause=0.1)
        assert time.monotonic() - started > 1.0
    assert answer.startswith("HTTP/1.1 200 "), answer[:500]


def test_an_upload_that_stalls_gets_a_408(caplog, predictor):
    """A client that sends part of its body and then nothing would hold its place and its
    share of the upload budget for as long as it liked: the request ends, with a 408."""
    caplog.set_level(logging.INFO, logger="openai_adapter")
    settings = Settings(body_idle_timeout_seconds=0.3)
    app = create_app(settings, transport=httpx.MockTransport(predictor))
    with uvicorn_server(app) as url:
        head = (
            "POST /v1/images/edits HTTP/1.1\r\nHost: adapter\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n"
            "Content-Length: 100000\r\nx-request-id: stalled\r\n\r\n"
        )
        with raw_connection(url, 5) as sock:
            sock.sendall(head.encode() + b"--x\r\n")
            started = time.monotonic()
            answer = sock.recv(65536).decode()
            assert sock.recv(1) == b"", "the connection is closed: the rest is not read"
            waited = time.monotonic() - started  # not the keep-alive timeout's 5 s
        assert answer.startswith("HTTP/1.1 408 "), answer
        assert '"code":"request_timeout"' in answer
        assert "Nothing of the request body arrived for 0.3 s" in answer
        assert waited < 3
        assert access_line(caplog, "stalled").startswith(
            "request_id=stalled POST /v1/images/edits 408 "
        )
        # nothing of the body at all: a stall too, not a body slower than the minimum rate
        with raw_connection(url, 5) as sock:
            sock.sendall(head.encode())
            answer = sock.recv(65536).decode()
        assert "Nothing of the request body arrived for 0.3 s" in answer, answer
