"""The text-to-image predictor, over real KServe REST and gRPC, on the tiny pipeline."""

from __future__ import annotations

import asyncio
import io
import re

import httpx
import numpy as np
import pytest
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from PIL import Image

from predictors import contract
from tests.servers import RunningPredictor

FAST = {"num_inference_steps": 2}


def infer(predictor: RunningPredictor, prompt: str = "a red cube", **fields) -> httpx.Response:
    body = contract.build_rest_body(prompt, **fields)
    return httpx.post(predictor.infer_url, json=body, timeout=120)


def generate(predictor: RunningPredictor, **fields) -> list[contract.ImageResult]:
    response = infer(predictor, **fields)
    assert response.status_code == 200, response.text
    return contract.parse_rest_response(response.json())


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_model_is_ready_and_server_live(generation_predictor):
    ready = httpx.get(f"{generation_predictor.url}/v2/models/qwen-image/ready")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    assert httpx.get(f"{generation_predictor.url}/v2/health/live").status_code == 200


def test_generates_images_of_the_asked_size_with_consecutive_seeds(generation_predictor):
    results = generate(generation_predictor, width=96, height=64, num_images=2, seed=7, **FAST)
    assert [r.seed for r in results] == [7, 8]
    for result in results:
        image = Image.open(io.BytesIO(result.data))
        assert image.format == "PNG"
        assert image.size == (96, 64)


def test_same_seed_same_pixels_other_seed_different(generation_predictor):
    first = generate(generation_predictor, width=64, height=64, seed=123, **FAST)[0]
    again = generate(generation_predictor, width=64, height=64, seed=123, **FAST)[0]
    other = generate(generation_predictor, width=64, height=64, seed=124, **FAST)[0]
    assert np.array_equal(pixels(first.data), pixels(again.data))
    assert np.abs(pixels(first.data) - pixels(other.data)).mean() > 1


def test_image_i_of_a_batch_matches_a_single_run_with_seed_plus_i(generation_predictor):
    batch = generate(generation_predictor, width=64, height=64, seed=50, num_images=2, **FAST)
    single = generate(generation_predictor, width=64, height=64, seed=51, **FAST)[0]
    # Batched and single forwards may differ in the last bits of float32 arithmetic.
    assert np.abs(pixels(batch[1].data) - pixels(single.data)).max() <= 2


def test_rest_binary_outputs_carry_raw_images(generation_predictor):
    body = contract.build_rest_body(
        "a red cube", width=64, height=80, num_images=2, seed=9, binary_output=True, **FAST
    )
    response = httpx.post(generation_predictor.infer_url, json=body, timeout=60)
    assert response.status_code == 200, response.text
    header_length = int(response.headers[contract.BINARY_HEADER_LENGTH])
    results = contract.parse_rest_binary_response(response.content, header_length)
    assert [r.seed for r in results] == [9, 10]
    json_results = generate(generation_predictor, width=64, height=80, num_images=2, seed=9, **FAST)
    for binary, text in zip(results, json_results, strict=True):
        assert Image.open(io.BytesIO(binary.data)).size == (64, 80)
        assert np.array_equal(pixels(binary.data), pixels(text.data))


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_encodes_the_requested_output_format(generation_predictor, output_format, pil_format):
    result = generate(
        generation_predictor, width=64, height=64, output_format=output_format, **FAST
    )[0]
    assert Image.open(io.BytesIO(result.data)).format == pil_format


def test_defaults_are_the_original_services(generation_predictor):
    """No size, seed or format: a 1664x928 PNG of seed 42 (two steps, to be quick)."""
    (result,) = generate(generation_predictor, **FAST)
    image = Image.open(io.BytesIO(result.data))
    assert (image.size, image.format, result.seed) == ((1664, 928), "PNG", 42)


@pytest.mark.parametrize(
    ("prompt", "fields", "message"),
    [
        ("", {}, "'prompt' must be a non-empty string"),
        ("   ", {}, "'prompt' must be a non-empty string"),
        ("a" * 32001, {}, "'prompt' has 32001 characters; at most 32000"),
        ("a", {"negative_prompt": "b" * 32001}, "'negative_prompt' has 32001 characters"),
        ("a", {"width": 100, "height": 64}, "'width' must be a multiple of 16"),
        ("a", {"width": 64, "height": 2064}, "'height' must be between 64 and 2048"),
        ("a", {"width": 32, "height": 64}, "'width' must be between 64 and 2048"),
        ("a", {"num_inference_steps": 1}, "'num_inference_steps' must be between 2 and 100"),
        ("a", {"num_inference_steps": 101}, "'num_inference_steps' must be between 2 and 100"),
        ("a", {"true_cfg_scale": 0.5}, "'true_cfg_scale' must be between 1.0 and 20.0"),
        ("a", {"true_cfg_scale": 21}, "'true_cfg_scale' must be between 1.0 and 20.0"),
        ("a", {"num_images": 11}, "'num_images' must be between 1 and 10"),
        ("a", {"seed": -1}, "'seed' must be between 0"),
        ("a", {"output_format": "gif"}, "'output_format' must be one of png, jpeg, webp"),
    ],
)
def test_invalid_requests_get_a_clear_400(generation_predictor, prompt, fields, message):
    response = infer(generation_predictor, prompt, **{"width": 64, "height": 64, **fields})
    assert response.status_code == 400
    assert message in response.json()["error"]


def post_json_text(predictor: RunningPredictor, body: str) -> httpx.Response:
    """POST a JSON body written by hand: what ``json.dumps`` would not write."""
    headers = {"content-type": "application/json"}
    return httpx.post(predictor.infer_url, content=body, headers=headers, timeout=120)


@pytest.mark.parametrize(
    ("prompt_tensor", "parameters", "message"),
    [
        ('"shape": [1], "data": ["a"]', '"true_cfg_scale": 1' + "0" * 400, "'true_cfg_scale'"),
        ('"shape": [1], "data": ["\\ud800"]', "", "'prompt' must be UTF-8 text"),
        ('"shape": [1], "data": [null]', "", "'prompt' must hold text, got NoneType"),
        ('"shape": [1], "data": [123]', "", "'prompt' must hold text, got int"),
        ('"shape": [1], "data": [["a cat"]]', "", "'prompt' must hold text, got list"),
        ('"shape": [7], "data": ["a cat"]', "", "'prompt' has shape [7] but holds 1 elements"),
        ('"shape": [2], "data": ["a", "b"]', "", "'prompt' must hold exactly one element"),
    ],
    ids=["huge-integer", "lone-surrogate", "null", "number", "nested", "shape", "two"],
)
def test_malformed_tensors_and_numbers_get_a_clear_400(
    generation_predictor, prompt_tensor, parameters, message
):
    """JSON allows what no prompt or parameter is: integers past any float, escapes of
    lone UTF-16 surrogates, elements that are not strings, shapes that do not match."""
    body = (
        '{"inputs": [{"name": "prompt", "datatype": "BYTES", ' + prompt_tensor + "}], "
        '"parameters": {"width": 64, "height": 64, "num_inference_steps": 2'
        + (", " + parameters if parameters else "")
        + "}}"
    )
    response = post_json_text(generation_predictor, body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('"parameters": {"seed": null}', "'seed' must be a number, a string or a boolean"),
        ('"parameters": {"output_format": ["png"]}', "'output_format' must be a number"),
        ('"parameters": 5', "not a v2 inference request: parameters: Input should be"),
    ],
    ids=["null", "list", "not-an-object"],
)
def test_bodies_kserves_request_model_refuses_get_a_clear_400(
    request, generation_predictor, body, message
):
    """What KServe's v2 request model refuses got FastAPI's 422 (``{"detail": ...}``). Such a
    request is counted and logged with its id as any invalid one (it was neither)."""
    rejected = rejected_invalid(generation_predictor)
    text = '{"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a"]}], '
    for url in (generation_predictor.infer_url, generation_predictor.infer_url + "_stream"):
        request_id = f"refused-{request.node.callspec.id}-{url.rsplit('/', 1)[1]}"
        response = httpx.post(
            url,
            content=f'{text}"id": "{request_id}", {body}}}',
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]
        assert f"request_id={request_id} model=qwen-image outcome=invalid" in (
            generation_predictor.log()
        )
    assert rejected_invalid(generation_predictor) == rejected + 2


def rejected_invalid(predictor) -> float:
    """The predictor's count of requests refused as invalid."""
    metrics = httpx.get(f"{predictor.url}/metrics").text
    name = 'qwen_image_requests_rejected_total{model_name="qwen-image",reason="invalid"}'
    match = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_an_image_input_is_refused_by_the_generation_model(generation_predictor):
    response = infer(generation_predictor, images=[b"\x89PNG"], width=64, height=64)
    assert response.status_code == 400
    assert "'image' is not an input of model qwen-image" in response.json()["error"]


def test_kserve_rest_client_can_call_it(generation_predictor):
    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2"))
        try:
            return await client.infer(generation_predictor.url, request, model_name="qwen-image")
        finally:
            await client.close()

    request = InferRequest(
        model_name="qwen-image",
        infer_inputs=[InferInput(contract.PROMPT, [1], "BYTES", ["a dog"])],
        parameters={"width": 64, "height": 80, "seed": 3, **FAST},
    )
    response = asyncio.run(call())
    images = response.get_output_by_name(contract.IMAGES).data
    image_bytes = contract.decode_bytes_from_rest(contract.IMAGES, images[0])
    assert Image.open(io.BytesIO(image_bytes)).size == (64, 80)
    assert response.get_output_by_name(contract.SEEDS).data == [3]


def test_kserve_grpc_client_can_call_it_with_raw_bytes(generation_predictor):
    async def call():
        client = InferenceGRPCClient(f"127.0.0.1:{generation_predictor.grpc_port}")
        try:
            return await client.infer(request)
        finally:
            await client.close()

    parameters = contract.build_parameters(
        width=64, height=64, true_cfg_scale=3.5, for_grpc=True, **FAST
    )
    request = InferRequest(
        model_name="qwen-image",
        infer_inputs=[InferInput(contract.PROMPT, [1], "BYTES", ["a dog"])],
        parameters=parameters,
    )
    response = asyncio.run(call())
    images = response.outputs[0].data
    assert images[0].startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(images[0])).size == (64, 64)


def test_metrics_count_images_and_rejections(generation_predictor):
    def sample(name: str, exported: bool = True) -> float:
        """A sample's value; 0 for one not exported yet, unless it must be."""
        metrics = httpx.get(f"{generation_predictor.url}/metrics").text
        match = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
        assert match or not exported, f"{name} is not exported"
        return float(match.group(1)) if match else 0.0

    images = 'qwen_image_images_generated_total{model_name="qwen-image"}'
    rejected = 'qwen_image_requests_rejected_total{model_name="qwen-image",reason="invalid"}'
    requests = 'qwen_image_request_duration_seconds_count{model_name="qwen-image",outcome="ok"}'
    before = {name: sample(name, exported=False) for name in (images, rejected, requests)}
    generate(generation_predictor, width=64, height=64, num_images=2, **FAST)
    infer(generation_predictor, "")
    assert sample(images) == before[images] + 2
    assert sample(rejected) == before[rejected] + 1
    assert sample(requests) >= before[requests] + 1
    assert sample('qwen_image_queue_depth{model_name="qwen-image"}') == 0.0


def test_each_request_is_logged_with_its_id(generation_predictor):
    body = contract.build_rest_body("a cat", request_id="req-abc-123", width=64, height=64, **FAST)
    response = httpx.post(generation_predictor.infer_url, json=body, timeout=60)
    assert response.json()["id"] == "req-abc-123"
    log = generation_predictor.log()
    assert "request_id=req-abc-123 model=qwen-image size=64x64 images=1 steps=2" in log

    body = contract.build_rest_body("", request_id="req-bad-456", width=64, height=64, **FAST)
    assert httpx.post(generation_predictor.infer_url, json=body, timeout=60).status_code == 400
    log = generation_predictor.log()
    assert "request_id=req-bad-456 model=qwen-image outcome=invalid" in log
    # A client's mistake is that one line: no error record or traceback besides it.
    assert "kserve.errors.InvalidInput" not in log and "Traceback" not in log
