"""The OpenAI Images API end to end: the real ``openai`` SDK against the running local stack.

Most requests ask for 2 steps and small sizes through ``extra_body`` so that the tiny CPU
pipelines answer quickly; the test about defaults uses none (the test stack runs 2 steps
when no quality is given, see ``tests/adapter_stack.py``).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import re
import socket
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

from tests.adapter_stack import API_KEY, Stack, encode_image, encode_mask
from tests.servers import wait_for_queue_depth_at

FAST = {"num_inference_steps": 2}
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}


def image_bytes(item: Any) -> bytes:
    return base64.b64decode(item.b64_json)


def open_image(item: Any) -> Image.Image:
    return Image.open(io.BytesIO(image_bytes(item)))


def small(client: OpenAI, **kwargs: Any) -> Any:
    """A quick 64x64 generation (2 steps unless ``quality`` is given); ``extra_body`` fields
    go in ``kwargs['extra']``."""
    extra = kwargs.pop("extra", {})
    if "quality" not in kwargs:
        extra = {**FAST, **extra}
    return client.images.generate(
        prompt=kwargs.pop("prompt", "a red square"),
        size=kwargs.pop("size", "64x64"),
        extra_body=extra,
        **kwargs,
    )


def test_generate_defaults(client: OpenAI):
    result = client.images.generate(prompt="A cute cat sleeping on a sofa")
    assert (result.size, result.output_format) == ("1664x928", "png")
    # the stack's quality table gives 'auto' 2 steps, the steps of no answer level
    assert (result.quality, result.background) == (None, "opaque")
    assert len(result.data) == 1 and result.data[0].seed == 42
    image = open_image(result.data[0])
    assert (image.format, image.size) == ("PNG", (1664, 928))
    assert result.created > 0


def test_generate_size_n_and_extra_body(client: OpenAI):
    result = client.images.generate(
        model="qwen-image",
        prompt="two cats",
        size="128x64",
        n=2,
        quality="auto",
        user="test-user",
        extra_body={**FAST, "seed": 11, "negative_prompt": "blurry", "true_cfg_scale": 2.0},
    )
    assert result.size == "128x64"
    assert [item.seed for item in result.data] == [11, 12]
    images = [open_image(item) for item in result.data]
    assert all((image.format, image.size) == ("PNG", (128, 64)) for image in images)
    assert image_bytes(result.data[0]) != image_bytes(result.data[1])


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_generate_output_formats(client: OpenAI, fmt: str, pil_format: str):
    result = small(client, size="96x64", output_format=fmt, output_compression=50)
    assert result.output_format == fmt
    data = image_bytes(result.data[0])
    assert data.startswith(MAGIC[fmt])
    image = open_image(result.data[0])
    assert (image.format, image.size) == (pil_format, (96, 64))


def test_width_and_height_override_size(client: OpenAI):
    result = small(client, size="128x128", extra={"width": 64})
    assert result.size == "64x128"
    assert open_image(result.data[0]).size == (64, 128)


def pixel_difference(a: Any, b: Any) -> int:
    """The largest difference between two images' channel values (0-255)."""
    pixels_a, pixels_b = (np.asarray(open_image(item), dtype=np.int16) for item in (a, b))
    return int(np.abs(pixels_a - pixels_b).max())


def test_seed_reproducibility(client: OpenAI):
    """A seed gives the same image again, and image i of n=2 is seed + i's. Across batch
    sizes the CPU's kernels may round differently, so there one channel level is allowed."""
    first = small(client, extra={"seed": 5})
    again = small(client, extra={"seed": 5})
    other = small(client, extra={"seed": 6})
    pair = small(client, n=2, extra={"seed": 5})
    assert image_bytes(first.data[0]) == image_bytes(again.data[0])
    assert pixel_difference(first.data[0], other.data[0]) > 32
    assert [item.seed for item in pair.data] == [5, 6]
    assert pixel_difference(pair.data[0], first.data[0]) <= 1
    assert pixel_difference(pair.data[1], other.data[0]) <= 1


def test_request_id_and_quality_reach_the_predictor(client: OpenAI, stack: Stack):
    raw = client.images.with_raw_response.generate(
        prompt="a cat", size="64x64", quality="low", extra_headers={"x-request-id": "req-e2e-1"}
    )
    assert raw.headers["x-request-id"] == "req-e2e-1"
    assert raw.parse().size == "64x64"

    def logged_by_both(log: str) -> bool:  # the lines reach the stack's log a little later
        lines = log.splitlines()
        return any(
            line.startswith("[generation-predictor]")
            and "request_id=req-e2e-1" in line
            and "steps=20" in line
            for line in lines
        ) and any(line.startswith("[adapter]") and "request_id=req-e2e-1" in line for line in lines)

    assert stack.wait_for(logged_by_both, 10), stack.log()[-3000:]
    generated = client.images.with_raw_response.generate(
        prompt="a cat", size="64x64", extra_body=FAST
    )
    assert len(generated.headers["x-request-id"]) == 32


def test_edit_file_handle_keeps_the_aspect_ratio(client: OpenAI, image_path):
    with image_path.open("rb") as image:
        result = client.images.edit(
            image=image, prompt="make the cat wear a party hat", extra_body=FAST
        )
    width, height = map(int, result.size.split("x"))
    assert abs(width / height - 320 / 192) < 0.05
    assert open_image(result.data[0]).size == (width, height)
    assert (result.output_format, result.data[0].seed) == ("png", 42)


def test_edit_raw_bytes(client: OpenAI):
    result = client.images.edit(
        image=encode_image((200, 200), "JPEG"),
        prompt="add a hat",
        size="128x128",
        output_format="webp",
        extra_body={**FAST, "seed": 3},
    )
    assert (result.size, result.output_format, result.data[0].seed) == ("128x128", "webp", 3)
    assert open_image(result.data[0]).format == "WEBP"


def test_edit_one_item_list(client: OpenAI):
    result = client.images.edit(
        image=[encode_image((128, 96), "WEBP")],
        prompt="add a hat",
        size="64x64",
        n=2,
        extra_body=FAST,
    )
    assert result.size == "64x64"
    assert [item.seed for item in result.data] == [42, 43]


def test_streams_yield_one_completed_event_per_image(client: OpenAI):
    """``stream=True`` without ``partial_images``: the SDK's stream of server-sent events,
    one completed event per image, for generations and edits."""
    events = list(small(client, stream=True, n=2, extra={"seed": 5}))
    assert [event.type for event in events] == ["image_generation.completed"] * 2
    assert [event.seed for event in events] == [5, 6]
    assert {
        (event.size, event.output_format, event.quality, event.background) for event in events
    } == {("64x64", "png", "auto", "opaque")}
    assert open_image(events[0]).size == (64, 64)
    assert image_bytes(events[0]) != image_bytes(events[1])

    edits = client.images.edit(
        image=encode_image((64, 64)), prompt="a hat", size="64x64", stream=True, extra_body=FAST
    )
    (edited,) = list(edits)
    assert edited.type == "image_edit.completed"
    assert open_image(edited).size == (64, 64)


def test_partial_images_stream_previews_before_each_final_image(client: OpenAI):
    """``partial_images=2`` over 6 steps: both images' previews as they are made (after
    steps 2 and 4), numbered per image and of the images' size and format, then the final
    images, which are those of the same request without a stream."""
    fields = {"n": 2, "size": "96x64", "output_format": "webp"}
    extra = {"seed": 5, "num_inference_steps": 6}
    events = list(small(client, stream=True, partial_images=2, extra=extra, **fields))
    partial, completed = "image_generation.partial_image", "image_generation.completed"
    assert [
        (event.type, getattr(event, "partial_image_index", None), event.seed) for event in events
    ] == [
        (partial, 0, 5),
        (partial, 0, 6),
        (partial, 1, 5),
        (partial, 1, 6),
        (completed, None, 5),
        (completed, None, 6),
    ]
    for event in events:
        assert (event.size, event.output_format) == ("96x64", "webp")
        assert (open_image(event).format, open_image(event).size) == ("WEBP", (96, 64))
    plain = small(client, extra=extra, **fields)
    for final, expected in zip(events[4:], plain.data, strict=True):
        assert np.array_equal(np.asarray(open_image(final)), np.asarray(open_image(expected)))

    edits = client.images.edit(
        image=encode_image((64, 64)),
        prompt="a hat",
        size="64x64",
        stream=True,
        partial_images=1,
        extra_body={"num_inference_steps": 3},
    )
    assert [event.type for event in edits] == ["image_edit.partial_image", "image_edit.completed"]


def test_edit_with_a_mask(client: OpenAI):
    """OpenAI's mask: the output keeps the image's aspect ratio at ~1024x1024 (128x96 gives
    1184x896), and the mask reaches the predictor: the same edit without it differs."""
    image = encode_image((128, 96))
    masked = client.images.edit(
        image=image,
        mask=encode_mask((128, 96), (0, 0, 64, 96)),
        prompt="a party hat on the left",
        extra_body=FAST,
    )
    plain = client.images.edit(image=image, prompt="a party hat on the left", extra_body=FAST)
    assert masked.size == plain.size == "1184x896"
    assert open_image(masked.data[0]).size == (1184, 896)
    assert image_bytes(masked.data[0]) != image_bytes(plain.data[0])

    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            image=image, mask=encode_mask((64, 64), (0, 0, 8, 8)), prompt="a hat", extra_body=FAST
        )
    assert_api_error(caught, openai.BadRequestError, 400, "invalid_value", "mask")
    assert caught.value.body["message"].startswith("'mask' is 64x64, and must have the size")


def test_a_json_edit_equals_the_multipart_one(client: OpenAI):
    """OpenAI's JSON edit body, sent over raw HTTP (the SDK sends forms), with the image and
    the mask as data URLs: the same edit as the SDK's form gives the same image."""
    image, mask = encode_image((128, 96)), encode_mask((128, 96), (0, 0, 64, 96))
    fields = {"prompt": "a party hat on the left", "seed": 7, **FAST}
    uploaded = client.images.edit(
        image=image, mask=mask, prompt=fields["prompt"], extra_body={"seed": 7, **FAST}
    )
    as_url = {
        "images": [{"image_url": f"data:image/png;base64,{base64.b64encode(image).decode()}"}],
        "mask": {"image_url": f"data:image/png;base64,{base64.b64encode(mask).decode()}"},
    }
    answer = httpx.post(
        f"{client.base_url}images/edits",
        json={**fields, **as_url},
        headers={"Authorization": f"Bearer {client.api_key}"},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["size"] == uploaded.size == "1184x896"
    assert base64.b64decode(answer.json()["data"][0]["b64_json"]) == image_bytes(uploaded.data[0])


def test_edit_from_several_images(edit_plus_client: OpenAI, client: OpenAI):
    """Qwen-Image-Edit-2509 and later edit from several images, which the SDK sends as a
    list: the output follows the last one's aspect ratio. Qwen-Image-Edit's pipeline (the
    stack's) says that it takes one."""
    images = [encode_image((128, 96)), encode_image((96, 128), "JPEG")]
    result = edit_plus_client.images.edit(
        image=images, prompt="the cat from the first on the sofa of the second", extra_body=FAST
    )
    width, height = map(int, result.size.split("x"))
    assert abs(width / height - 96 / 128) < 0.05
    assert open_image(result.data[0]).size == (width, height)

    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=images, prompt="the cat on the sofa", extra_body=FAST)
    assert_api_error(caught, openai.BadRequestError, 400, "invalid_value", "image")
    assert "edits one: send one, or serve Qwen-Image-Edit-2509" in caught.value.body["message"]


def test_ignored_openai_fields_are_accepted(client: OpenAI):
    """The SDK's fields that mean nothing to Qwen-Image pass, as docs/adapter.md says, and
    the end-user id comes back as OpenAI echoes it: ``safety_identifier``, else ``user``."""
    ignored = {"user": "user-1", "safety_identifier": "hashed-user-1", "complexity": "high"}
    generated = small(client, moderation="low", style="vivid", partial_images=0, **ignored)
    edited = client.images.edit(
        image=encode_image((64, 64)),
        prompt="add a hat",
        size="64x64",
        input_fidelity="high",
        extra_body=FAST,
        **ignored,
    )
    assert generated.size == edited.size == "64x64"
    assert generated.safety_identifier == edited.safety_identifier == "hashed-user-1"
    assert small(client, user="user-1").safety_identifier == "user-1"
    assert small(client, user="user-1", safety_identifier="").safety_identifier == "user-1"
    (event,) = small(client, stream=True, safety_identifier="hashed-user-1")
    assert event.safety_identifier == "hashed-user-1"
    anonymous = small(client).model_dump(exclude_unset=True)
    assert "safety_identifier" not in anonymous


def test_models(client: OpenAI):
    assert {model.id for model in client.models.list()} == {"qwen-image", "qwen-image-edit"}
    model = client.models.retrieve("qwen-image-edit")
    assert (model.id, model.object) == ("qwen-image-edit", "model")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("dall-e-3")
    assert caught.value.code == "model_not_found"


def assert_api_error(caught: pytest.ExceptionInfo, cls: type, status: int, code: str, param):
    error = caught.value
    assert isinstance(error, cls), repr(error)
    assert (error.status_code, error.code, error.param) == (status, code, param), error.body
    assert error.body["message"]


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "param"),
    [
        ({"n": 11}, 400, "invalid_value", "n"),
        ({"n": 5}, 400, "invalid_value", "n"),  # over the predictor's QWEN_MAX_IMAGES=4
        ({"size": "100x100"}, 400, "invalid_value", "size"),
        ({"size": "4096x4096"}, 400, "invalid_value", "size"),
        ({"extra": {"width": 32}}, 400, "invalid_value", "width"),
        ({"quality": "max"}, 400, "invalid_value", "quality"),  # 100 steps > QWEN_MAX_STEPS
        ({"extra": {"num_inference_steps": 61}}, 400, "invalid_value", "num_inference_steps"),
        ({"extra": {"seed": -1}}, 400, "invalid_value", "seed"),
        ({"extra": {"true_cfg_scale": 50}}, 400, "invalid_value", "true_cfg_scale"),
        ({"prompt": "   "}, 400, "invalid_value", "prompt"),
        ({"prompt": ""}, 400, "invalid_value", "prompt"),
        ({"output_format": "bmp"}, 400, "invalid_value", "output_format"),
        ({"output_format": "gif"}, 400, "unsupported_value", "output_format"),
        ({"output_format": "svg"}, 400, "unsupported_value", "output_format"),
        ({"frame_count": 4}, 400, "unsupported_value", "frame_count"),
        ({"frame_duration_ms": 100}, 400, "unsupported_value", "frame_duration_ms"),
        ({"svg": {"model": "an-svg-author"}}, 400, "unsupported_value", "svg"),
        ({"complexity": "extreme"}, 400, "invalid_value", "complexity"),
        ({"response_format": "url"}, 400, "unsupported_value", "response_format"),
        ({"background": "transparent"}, 400, "unsupported_value", "background"),
        ({"stream": True, "extra": {"width": 32}}, 400, "invalid_value", "width"),
        ({"partial_images": 4}, 400, "invalid_value", "partial_images"),
        ({"extra": {"guidance": 3}}, 400, "unknown_parameter", "guidance"),
        ({"model": "dall-e-3"}, 404, "model_not_found", "model"),
        ({"model": "qwen-image-edit"}, 400, "invalid_value", "model"),
    ],
)
def test_generation_errors(client: OpenAI, kwargs, status, code, param):
    cls = openai.NotFoundError if status == 404 else openai.BadRequestError
    with pytest.raises(openai.APIStatusError) as caught:
        small(client, **kwargs)
    assert_api_error(caught, cls, status, code, param)


@pytest.mark.parametrize(
    ("kwargs", "code", "param"),
    [
        ({"image": "two"}, "invalid_value", "image"),  # the stack's model edits one
        ({"mask": "png"}, "invalid_value", "mask"),  # no alpha channel
        ({"mask": "jpeg"}, "invalid_image_format", "mask"),  # no alpha channel, by its format
        ({"image": b"just some text"}, "invalid_image_format", "image"),
        ({"model": "qwen-image"}, "invalid_value", "model"),
        ({"size": "64x48"}, "invalid_value", "size"),
        ({"extra_body": {"height": 64}}, "invalid_value", "width"),
        ({"markup": "png"}, "unsupported_value", "markup"),
        ({"output_format": "gif", "frame_count": 4}, "unsupported_value", "output_format"),
        ({"frame_duration_ms": 100}, "unsupported_value", "frame_duration_ms"),
        # sent in the form as svg[model] and svg[reasoning][effort]
        (
            {"svg": {"model": "an-svg-author", "reasoning": {"effort": "low"}}},
            "unsupported_value",
            "svg",
        ),
    ],
)
def test_edit_errors(client: OpenAI, kwargs, code, param):
    png = encode_image((64, 64))
    image = kwargs.pop("image", png)
    if image == "two":
        image = [png, png]
    for field in ("mask", "markup"):
        if kwargs.get(field) == "png":
            kwargs[field] = png
        elif kwargs.get(field) == "jpeg":
            kwargs[field] = encode_image((64, 64), "JPEG")
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=image, prompt="a hat", **kwargs)
    assert_api_error(caught, openai.BadRequestError, 400, code, param)


def test_busy_predictor_answers_503_and_keeps_what_it_accepted(client: OpenAI, stack: Stack):
    """Fill the generation predictor (1 running + QWEN_MAX_QUEUE_SIZE=4 waiting); one more
    request is refused with a retryable 503, and every accepted one still completes."""
    capacity = 5

    def slow(index: int) -> Any:
        return small(client, prompt=f"slow {index}", size="512x512", extra={"seed": index})

    with concurrent.futures.ThreadPoolExecutor(capacity) as pool:
        accepted = [pool.submit(slow, index) for index in range(capacity)]
        wait_for_queue_depth_at(stack.generation_url, "qwen-image", capacity, timeout=60)
        with pytest.raises(openai.InternalServerError) as caught:
            small(client)
        assert_api_error(caught, openai.InternalServerError, 503, "predictor_busy", None)
        assert caught.value.response.headers["retry-after"] == "5"
        results = [future.result() for future in accepted]
    assert [result.data[0].seed for result in results] == list(range(capacity))


def test_a_client_that_gives_up_frees_its_place_in_the_queue(client: OpenAI, stack: Stack):
    """A client that times out while its request waits behind a running one takes it out of
    the predictor's queue: the adapter cancels its predictor call when the client leaves
    (access log 499), and the predictor drops the waiting request, which never runs."""
    impatient = client.with_options(timeout=2, max_retries=0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            small, client, size="1024x1024", extra={"num_inference_steps": 24, "seed": 7}
        )
        wait_for_queue_depth_at(stack.generation_url, "qwen-image", 1, timeout=20)
        with pytest.raises(openai.APITimeoutError):
            small(impatient, extra_headers={"x-request-id": "gave-up"})
        wait_for_queue_depth_at(stack.generation_url, "qwen-image", 1, timeout=20)
        assert running.result().data[0].seed == 7
    assert stack.wait_for(
        lambda log: "request_id=gave-up model=qwen-image outcome=cancelled" in log, 10
    ), stack.log()[-3000:]
    assert re.search(r"request_id=gave-up POST /v1/images/generations 499", stack.log())
    assert "request_id=gave-up model=qwen-image size=" not in stack.log(), "it ran"
    adapter_metrics = httpx.get(stack.base_url.removesuffix("/v1") + "/metrics").text
    assert (
        'qwen_image_adapter_requests_total{method="POST",route="/v1/images/generations",'
        'status="499"} 1.0' in adapter_metrics
    )


def test_a_client_that_leaves_a_stream_stops_its_generation(client: OpenAI, stack: Stack):
    """Leaving a stream after its first preview closes the adapter's call to the predictor,
    whose batch then stops at its next step instead of denoising for nobody."""
    steps = 60  # the test stack's most: several seconds at 1024x1024
    events = small(
        client,
        size="1024x1024",
        stream=True,
        partial_images=3,
        extra={"num_inference_steps": steps},
        extra_headers={"x-request-id": "left-stream"},
    )
    first = next(iter(events))
    assert first.type == "image_generation.partial_image"
    events.close()
    stopped = (
        r"request_id=left-stream .*outcome=cancelled[\s\S]*"
        rf"every caller of a batch of 1 left; after step (\d+)/{steps}"
    )
    assert stack.wait_for(lambda log: re.search(stopped, log) is not None, 20), stack.log()[-3000:]
    assert int(re.search(stopped, stack.log())[1]) < steps
    # the adapter's access line and metrics say the client left, as for an unstreamed answer
    access = r"openai_adapter.access: request_id=left-stream POST /v1/images/generations (\d+) "
    assert stack.wait_for(lambda log: re.search(access, log) is not None, 20)
    assert re.search(access, stack.log())[1] == "499"


def test_predictor_down_is_503(down_adapter: str):
    client = OpenAI(base_url=down_adapter, api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        small(client)
    assert_api_error(caught, openai.InternalServerError, 503, "predictor_unavailable", None)
    assert caught.value.response.headers["retry-after"] == "5"
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.edit(image=encode_image((64, 64)), prompt="a hat")
    assert caught.value.status_code == 503
    ready = httpx.get(down_adapter.removesuffix("/v1") + "/health/ready")
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"


def test_endless_request_headers_get_a_400_and_a_closed_connection(down_adapter: str):
    """Before any authentication: uvicorn's default parser kept every header it was sent,
    so one connection's endless headers grew the adapter's memory without bound (and no
    answer came). Past 32 KiB of headers still incomplete, a 400; 20 KB of headers pass."""
    port = int(down_adapter.removesuffix("/v1").rsplit(":", 1)[1])
    request_line = b"GET /health/live HTTP/1.1\r\nHost: adapter\r\n"
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 990) for i in range(20))
    for ending, status in ((b"Connection: close\r\n\r\n", b"200"), (headers * 2, b"400")):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request_line + headers + ending)  # the second never ends
            answer = b""
            while part := sock.recv(65536):
                answer += part
        assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]


def test_api_key_is_required_when_set(down_adapter: str):
    client = OpenAI(base_url=down_adapter, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert_api_error(caught, openai.AuthenticationError, 401, "invalid_api_key", None)
    missing = httpx.get(f"{down_adapter}/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    client = OpenAI(base_url=down_adapter, api_key=API_KEY, max_retries=0)
    assert [model.id for model in client.models.list()] == ["qwen-image", "qwen-image-edit"]


def test_predictor_timeout_is_504(impatient_adapter: str):
    client = OpenAI(base_url=impatient_adapter, api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        small(client, size="256x256")
    assert_api_error(caught, openai.InternalServerError, 504, "predictor_timeout", None)
    assert caught.value.response.headers["x-should-retry"] == "false"
    # This adapter has the edit model switched off.
    assert [model.id for model in client.models.list()] == ["qwen-image"]
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.edit(image=encode_image((64, 64)), prompt="a hat")
    assert_api_error(caught, openai.NotFoundError, 404, "model_not_found", "model")
