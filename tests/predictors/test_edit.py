"""The edit predictor over real KServe REST, on the tiny pipeline."""

from __future__ import annotations

import asyncio
import io

import grpc
import httpx
import numpy as np
import pytest
from kserve import InferenceGRPCClient, InferInput, InferRequest, InferResponse
from PIL import Image

from predictors import contract
from predictors.contract import ContractError, Limits
from predictors.edit import QwenImageEditModel
from predictors.images import decode_edit_area, decode_image
from predictors.model import PredictorOptions
from tests.adapter_stack import encode_mask
from tests.predictors.conftest import EDIT_MAX_INPUT_PIXELS
from tests.servers import RunningPredictor

FAST = {"num_inference_steps": 2}


def encoded(size: tuple[int, int], image_format: str, mode: str = "RGB") -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(noise).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def edit(predictor: RunningPredictor, *images: bytes, **fields) -> httpx.Response:
    body = contract.build_rest_body("make it blue", images=images, **fields)
    return httpx.post(predictor.infer_url, json=body, timeout=120)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_edit_follows_the_input_aspect_ratio(edit_predictor, image_format):
    response = edit(edit_predictor, encoded((96, 64), image_format), **FAST)
    assert response.status_code == 200, response.text
    (result,) = contract.parse_rest_response(response.json())
    width, height = Image.open(io.BytesIO(result.data)).size
    assert abs(width / height - 1.5) < 0.05
    assert 0.8 < width * height / 1024**2 < 1.2
    assert result.seed == 42


def test_edit_honours_an_explicit_size(edit_predictor):
    response = edit(edit_predictor, encoded((64, 64), "PNG"), width=128, height=64, **FAST)
    (result,) = contract.parse_rest_response(response.json())
    assert Image.open(io.BytesIO(result.data)).size == (128, 64)


def test_an_extreme_aspect_ratio_is_refused_with_an_explicit_size_too(edit_predictor):
    """The pipeline resizes the input to its ~1024x1024 area whatever the output size: a
    1x4096 input would become 0 pixels wide."""
    response = edit(edit_predictor, encoded((1, 4096), "PNG"), width=128, height=64, **FAST)
    assert response.status_code == 400
    assert "'image' has an aspect ratio of 1:4096" in response.json()["error"]


def test_an_elongated_input_is_edited_at_an_explicit_size(edit_predictor):
    """A 6:1 panorama gives an output outside the size limits at the pipeline's own size,
    but is fine at a size the request names."""
    response = edit(edit_predictor, encoded((600, 100), "PNG"), width=384, height=64, **FAST)
    assert response.status_code == 200, response.text
    (result,) = contract.parse_rest_response(response.json())
    assert Image.open(io.BytesIO(result.data)).size == (384, 64)


def multi_picture_jpeg() -> bytes:
    """An MPO, as phone cameras write: a 96x64 red picture, then a 64x96 blue one."""
    buffer = io.BytesIO()
    second = Image.new("RGB", (64, 96), "blue")
    Image.new("RGB", (96, 64), "red").save(
        buffer, format="MPO", save_all=True, append_images=[second]
    )
    return buffer.getvalue()


def test_a_multi_picture_jpeg_is_edited_from_its_first_picture(edit_predictor):
    data = multi_picture_jpeg()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    first = decode_image(data, EDIT_MAX_INPUT_PIXELS)
    assert first.size == (96, 64)
    assert np.abs(np.asarray(first, dtype=int) - (255, 0, 0)).max() < 8

    response = edit(edit_predictor, data, **FAST)
    assert response.status_code == 200, response.text
    (result,) = contract.parse_rest_response(response.json())
    width, height = Image.open(io.BytesIO(result.data)).size
    assert abs(width / height - 1.5) < 0.05


def phone_photo(damaged_exif: bool = False) -> bytes:
    """A JPEG as a phone held upright writes it: stored 96x64 (red left, blue right) with
    EXIF orientation 6, which viewers show turned a quarter clockwise, 64x96, red on top.
    ``damaged_exif``: its Make tag renumbered as Compression, whose text value Pillow can
    read but not write back."""
    stored = Image.new("RGB", (96, 64), "blue")
    stored.paste("red", (0, 0, 48, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    exif[0x010F] = "Phone"  # Make: tag, type ASCII
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif)
    if damaged_exif:
        return buffer.getvalue().replace(b"\x01\x0f\x00\x02", b"\x01\x03\x00\x02", 1)
    return buffer.getvalue()


def test_a_photo_is_edited_upright_as_its_exif_orientation_says(edit_predictor):
    for photo in (phone_photo(), phone_photo(damaged_exif=True)):
        upright = decode_image(photo, EDIT_MAX_INPUT_PIXELS)
        assert upright.size == (64, 96)
        pixels = np.asarray(upright, dtype=int)
        assert np.abs(pixels[:40] - (255, 0, 0)).max() < 40
        assert np.abs(pixels[56:] - (0, 0, 255)).max() < 40

    assert output_size(edit(edit_predictor, phone_photo(), **FAST)) == (832, 1248)
    # A mask drawn on the photo as it is shown has its size.
    mask = encode_mask((64, 96), (0, 0, 64, 48))
    assert output_size(edit(edit_predictor, phone_photo(), mask=mask, **FAST)) == (832, 1248)


def test_a_16_bit_grayscale_png_keeps_its_levels():
    levels = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16"
    pixels = np.asarray(decode_image(buffer.getvalue(), EDIT_MAX_INPUT_PIXELS))
    assert pixels[0].tolist() == [[0, 0, 0], [64, 64, 64], [128, 128, 128], [255, 255, 255]]


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """The (marker, bytes) segments of a JPEG after its SOI, up to its EOI; a scan's
    segment runs to the next marker (a 0xFF byte not followed by 0 or a restart marker)."""
    segments, index = [], 2
    while data[index + 1] != 0xD9:
        marker = data[index + 1]
        end = index + 2 + int.from_bytes(data[index + 2 : index + 4], "big")
        if marker == 0xDA:
            while not (
                data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7
            ):
                end += 1
        segments.append((marker, data[index:end]))
        index = end
    return segments


def progressive_jpeg(side: int, repeated_scans: int) -> bytes:
    """A flat gray progressive JPEG whose second scan (a few bytes of end-of-band runs) is
    repeated ``repeated_scans`` times: still a valid file, which the decoder walks again
    for each scan."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, format="JPEG", progressive=True)
    segments = jpeg_segments(buffer.getvalue())
    scans = [segment for marker, segment in segments if marker == 0xDA]
    head = b"\xff\xd8" + b"".join(segment for marker, segment in segments if marker != 0xDA)
    return head + b"".join(scans) + scans[1] * repeated_scans + b"\xff\xd9"


def test_a_jpeg_of_too_many_scans_is_refused_before_it_is_decoded():
    """0.9 s of decoding at 1000 repeated scans of a 4096x4096 image; a 20 MB file of such
    scans took about 11 minutes. Refused from the count of its scan markers instead."""
    normal = progressive_jpeg(64, 0)
    assert decode_image(normal, EDIT_MAX_INPUT_PIXELS).size == (64, 64)
    assert decode_image(progressive_jpeg(64, 80), EDIT_MAX_INPUT_PIXELS).size == (64, 64)
    bomb = progressive_jpeg(4096, 1000)
    assert len(bomb) < 100_000
    with pytest.raises(ContractError, match="is a JPEG of 1006 scans, more than the 100 "):
        decode_image(bomb, 4096 * 4096)


def test_a_16_bit_grayscale_mask_marks_its_transparent_level():
    """A tRNS chunk makes one gray level transparent; Pillow's RGBA conversion of 16-bit
    grayscale drops it, and the mask was refused as marking nothing."""
    levels = np.array([[0, 1000], [1000, 1000]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG", transparency=1000)
    image = Image.new("RGB", (2, 2))
    area = decode_edit_area(buffer.getvalue(), image, "'image'", EDIT_MAX_INPUT_PIXELS)
    assert np.asarray(area).tolist() == [[0, 255], [255, 255]]


def test_a_deployment_may_accept_inputs_past_pillows_own_pixel_limit(monkeypatch):
    """``--max_input_pixels`` above Pillow's decompression-bomb limit (89.5 M pixels) is
    honoured: the edit model raises Pillow's limit to it, and larger inputs are refused
    with the deployment's limit in the message."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    size = (10000, 9000)  # 90 M pixels
    buffer = io.BytesIO()
    Image.new("1", size).save(buffer, format="PNG")
    limits = Limits(max_input_pixels=100_000_000)
    QwenImageEditModel("edit", PredictorOptions(limits=limits)).stop()

    assert decode_image(buffer.getvalue(), limits.max_input_pixels).size == size
    with pytest.raises(ContractError, match="more than the 80000000 pixels"):
        decode_image(buffer.getvalue(), 80_000_000)


def decompression_bomb() -> bytes:
    """A 48 KB PNG that declares 20000x20000 pixels."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"this is not an image", "'image' is not a PNG, JPEG or WebP image"),
        # Only the PNG, JPEG and WebP parsers are tried: no other format is even read.
        (encoded((64, 64), "GIF", mode="P"), "'image' is not a PNG, JPEG or WebP image"),
        (encoded((64, 64), "PNG")[:200], "'image' could not be decoded"),
        # Cut or corrupt in their headers, which Pillow reads as it opens them.
        (encoded((64, 64), "PNG")[:20], "'image' could not be decoded"),
        (encoded((64, 64), "JPEG")[:30], "'image' could not be decoded"),
        (encoded((64, 64), "WEBP")[:30] + bytes(10), "'image' could not be decoded"),
        (encoded((1100, 1000), "PNG"), f"more than the {EDIT_MAX_INPUT_PIXELS} pixels"),
        (encoded((1000, 90), "PNG"), "'image' has an aspect ratio of 1000:90"),
        (decompression_bomb(), f"more than the {EDIT_MAX_INPUT_PIXELS} pixels"),
    ],
    ids=[
        "not-an-image",
        "gif",
        "truncated",
        "png-header-cut",
        "jpeg-header-cut",
        "webp-header-corrupt",
        "over-pixel-limit",
        "extreme-aspect",
        "bomb",
    ],
)
def test_bad_images_get_a_clear_400(edit_predictor, image, message):
    response = edit(edit_predictor, image, **FAST)
    assert response.status_code == 400
    assert message in response.json()["error"]


def edit_prompt(predictor: RunningPredictor, prompt: str) -> httpx.Response:
    body = contract.build_rest_body(
        prompt, images=[encoded((64, 64), "PNG")], width=64, height=64, **FAST
    )
    return httpx.post(predictor.infer_url, json=body, timeout=120)


def test_a_long_prompt_is_cut_to_its_first_512_tokens_as_for_generation(edit_predictor):
    """The edit pipelines keep every token of a prompt, and a long one overflowed the
    transformer's text positions (a 500). Cut as a generation's, two prompts whose first 512
    tokens agree edit alike."""
    prompt = " ".join(f"a red cube number {n} on the table" for n in range(200))  # 7000 chars
    first, second = (
        edit_prompt(edit_predictor, text) for text in (prompt, prompt + " and a blue sphere")
    )
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    (first_image,), (second_image,) = (
        contract.parse_rest_response(response.json()) for response in (first, second)
    )
    first_pixels, second_pixels = (
        np.asarray(Image.open(io.BytesIO(image.data)), dtype=int)
        for image in (first_image, second_image)
    )
    assert np.abs(first_pixels - second_pixels).max() <= 1  # the text encoder's rounding


def test_width_without_height_gets_a_clear_400(edit_predictor):
    response = edit(edit_predictor, encoded((64, 64), "PNG"), width=128, **FAST)
    assert response.status_code == 400
    assert "'height' is required when the other side is given" in response.json()["error"]


def test_missing_image_and_bad_base64_get_a_clear_400(edit_predictor):
    body = contract.build_rest_body("make it blue", **FAST)
    response = httpx.post(edit_predictor.infer_url, json=body, timeout=30)
    assert response.status_code == 400
    assert "'image' is required" in response.json()["error"]

    body = contract.build_rest_body("make it blue", images=[b"x"], **FAST)
    body["inputs"][1]["data"] = ["not base64!"]
    response = httpx.post(edit_predictor.infer_url, json=body, timeout=30)
    assert response.status_code == 400
    assert "'image' must be base64-encoded over REST" in response.json()["error"]


@pytest.mark.parametrize("element", [5, ["abc"]], ids=["number", "list"])
def test_an_image_element_that_is_not_a_string_gets_a_clear_400(edit_predictor, element):
    body = contract.build_rest_body("make it blue", images=[b"x"], **FAST)
    body["inputs"][1]["data"] = [element]
    response = httpx.post(edit_predictor.infer_url, json=body, timeout=30)
    assert response.status_code == 400
    assert "'image' must be a base64-encoded string over REST" in response.json()["error"]


def output_size(response: httpx.Response) -> tuple[int, int]:
    assert response.status_code == 200, response.text
    (result,) = contract.parse_rest_response(response.json())
    return Image.open(io.BytesIO(result.data)).size


def test_the_plus_pipeline_edits_from_several_images(edit_plus_predictor):
    """Qwen-Image-Edit-2509 and later: the output follows the last image's aspect ratio."""
    wide, tall = encoded((96, 64), "PNG"), encoded((64, 96), "JPEG")
    width, height = output_size(edit(edit_plus_predictor, wide, tall, **FAST))
    assert abs(width / height - 64 / 96) < 0.05
    assert 0.8 < width * height / 1024**2 < 1.2
    assert output_size(edit(edit_plus_predictor, tall, wide, width=128, height=64, **FAST)) == (
        128,
        64,
    )
    assert "Loading QwenImageEditPlusPipeline" in edit_plus_predictor.log()


async def grpc_infer(predictor: RunningPredictor, request: InferRequest) -> InferResponse:
    client = InferenceGRPCClient(f"127.0.0.1:{predictor.grpc_port}", retries=0)
    try:
        return await client.infer(request)
    finally:
        await client.close()


def test_several_images_travel_as_raw_bytes_over_grpc(edit_plus_predictor):
    images = [encoded((96, 64), "WEBP"), encoded((64, 64), "PNG"), encoded((64, 128), "JPEG")]
    request = InferRequest(
        model_name="qwen-image-edit",
        infer_inputs=[
            InferInput(contract.PROMPT, [1], "BYTES", ["make them one"]),
            InferInput(contract.IMAGE, [3], "BYTES", images),
        ],
        parameters=contract.build_parameters(for_grpc=True, **FAST),
    )
    (output,) = asyncio.run(grpc_infer(edit_plus_predictor, request)).outputs[0].data
    width, height = Image.open(io.BytesIO(output)).size
    assert abs(width / height - 0.5) < 0.05


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (4, "'image' holds 4 images; this deployment edits from at most 3"),
        (b"not an image", "'image' 2 of 2 is not a PNG, JPEG or WebP image"),
        (encoded((1000, 90), "PNG"), "'image' 2 of 2 has an aspect ratio of 1000:90"),
    ],
    ids=["too-many", "second-not-an-image", "second-too-elongated"],
)
def test_several_images_get_clear_400s_that_name_the_image(edit_plus_predictor, images, message):
    good = encoded((64, 64), "PNG")
    images = [good] * images if isinstance(images, int) else [good, images]
    response = edit(edit_plus_predictor, *images, **FAST)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_the_first_edit_pipeline_refuses_several_images(edit_predictor):
    """``QwenImageEditPipeline`` (Qwen-Image-Edit) conditions on one image only."""
    image = encoded((64, 64), "PNG")
    response = edit(edit_predictor, image, image, **FAST)
    assert response.status_code == 400
    error = response.json()["error"]
    assert "'image' holds 2 images, and this model (QwenImageEditPipeline) edits one" in error
    assert "Qwen-Image-Edit-2509" in error


def test_a_masked_edit_keeps_the_images_aspect_ratio(edit_predictor):
    """96x64 at the pipeline's ~1024x1024 area is 1248x832; asking for that size is allowed."""
    image, mask = encoded((96, 64), "PNG"), encode_mask((96, 64), (0, 0, 48, 64))
    assert output_size(edit(edit_predictor, image, mask=mask, **FAST)) == (1248, 832)
    response = edit(edit_predictor, image, mask=mask, width=1248, height=832, **FAST)
    assert output_size(response) == (1248, 832)


def test_a_webp_mask_with_alpha_is_taken(edit_predictor):
    mask = encode_mask((64, 64), (0, 0, 32, 32), "WEBP")
    assert output_size(edit(edit_predictor, encoded((64, 64), "PNG"), mask=mask, **FAST)) == (
        1024,
        1024,
    )


@pytest.mark.parametrize(
    ("mask", "fields", "message"),
    [
        (
            encode_mask((64, 48), (0, 0, 8, 8)),
            {},
            "'mask' is 64x48, and must have the size of the image it masks ('image': 96x64)",
        ),
        (encoded((96, 64), "PNG"), {}, "'mask' has no alpha channel"),
        (encoded((96, 64), "JPEG"), {}, "'mask' has no alpha channel"),
        (encode_mask((96, 64), (0, 0, 0, 0)), {}, "'mask' has no fully transparent pixel"),
        (b"not an image", {}, "'mask' is not a PNG, JPEG or WebP image"),
        (encode_mask((96, 64), (0, 0, 8, 8))[:20], {}, "'mask' could not be decoded"),
        (b"", {}, "'mask' is empty"),
        (
            encode_mask((96, 64), (0, 0, 48, 64)),
            {"width": 1024, "height": 1024},
            "'mask' sets the output size to 1248x832 (the aspect ratio of 'image' at "
            "~1024x1024): leave the size out or ask for that one, not 1024x1024",
        ),
    ],
    ids=[
        "other-size",
        "no-alpha",
        "jpeg",
        "opaque",
        "not-an-image",
        "header-cut",
        "empty",
        "other-output-size",
    ],
)
def test_bad_masks_get_a_clear_400(edit_predictor, mask, fields, message):
    response = edit(edit_predictor, encoded((96, 64), "PNG"), mask=mask, **FAST, **fields)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_a_mask_applies_to_the_first_of_several_images(edit_plus_predictor):
    """As OpenAI's: the output keeps the first image's aspect ratio (the last image's without
    a mask), and a mask of another size than the first image's is refused."""
    wide, tall = encoded((96, 64), "PNG"), encoded((64, 96), "JPEG")
    mask = encode_mask((96, 64), (0, 0, 48, 64))
    assert output_size(edit(edit_plus_predictor, wide, tall, mask=mask, **FAST)) == (1248, 832)
    assert "size=1248x832 images=1 steps=2 cfg=4.00 seed=42 inputs=2 mask=yes" in (
        edit_plus_predictor.log()
    )
    response = edit(edit_plus_predictor, tall, wide, mask=mask, **FAST)
    assert response.status_code == 400
    assert (
        "must have the size of the image it masks ('image' 1 of 2: 64x96)"
        in (response.json()["error"])
    )


def test_two_masks_get_a_clear_400(edit_predictor):
    mask = encode_mask((64, 64), (0, 0, 8, 8))
    body = contract.build_rest_body("make it blue", images=[encoded((64, 64), "PNG")], mask=mask)
    body["inputs"][-1]["shape"] = [2]
    body["inputs"][-1]["data"] *= 2
    response = httpx.post(edit_predictor.infer_url, json=body, timeout=30)
    assert response.status_code == 400
    assert "'mask' must hold exactly one element" in response.json()["error"]


def test_the_generation_predictor_takes_no_mask(generation_predictor):
    body = contract.build_rest_body("a cat", mask=encode_mask((64, 64), (0, 0, 8, 8)))
    response = httpx.post(generation_predictor.infer_url, json=body, timeout=30)
    assert response.status_code == 400
    assert "'mask' is not an input of model qwen-image" in response.json()["error"]


def test_images_in_grpc_raw_contents_are_read(edit_plus_predictor):
    """KServe's and Triton's clients send numpy arrays as raw contents (``binary_data``,
    the default), not in the tensor's own fields; the answer then comes raw too."""
    images = [encoded((96, 64), "PNG"), encoded((64, 128), "JPEG")]
    prompt = InferInput(contract.PROMPT, [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"make them one"], dtype=np.object_))
    image = InferInput(contract.IMAGE, [2], "BYTES")
    image.set_data_from_numpy(np.array(images, dtype=np.object_))
    request = InferRequest(
        model_name="qwen-image-edit",
        infer_inputs=[prompt, image],
        parameters=contract.build_parameters(for_grpc=True, **FAST),
    )
    images_out, seeds = asyncio.run(grpc_infer(edit_plus_predictor, request)).outputs
    (output,) = images_out.as_numpy()
    width, height = Image.open(io.BytesIO(output)).size
    assert abs(width / height - 0.5) < 0.05
    assert seeds.as_numpy().tolist() == [42]

    image._raw_data = image._raw_data[:-10]  # the last image's bytes cut short
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(grpc_infer(edit_plus_predictor, request))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'image' has raw contents that are not a BYTES tensor's" in refused.value.details()


def test_rest_inputs_as_binary_data_get_a_clear_400(edit_predictor):
    """KServe's binary tensor extension (as its REST client sends numpy arrays): KServe's
    server reads binary BYTES inputs as UTF-8 text, and answered an image file with a 500
    that repeated the file."""
    image = encoded((96, 64), "PNG")
    prompt = InferInput(contract.PROMPT, [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"make it blue"], dtype=np.object_))
    element = InferInput(contract.IMAGE, [1], "BYTES")
    element.set_data_from_numpy(np.array([image], dtype=np.object_))
    body, header_length = InferRequest(
        model_name="qwen-image-edit", infer_inputs=[prompt, element], parameters=FAST
    ).to_rest()
    assert header_length is not None
    response = httpx.post(
        edit_predictor.infer_url,
        content=body,
        headers={
            "content-type": "application/octet-stream",
            contract.BINARY_HEADER_LENGTH: str(header_length),
        },
    )
    assert response.status_code == 400
    assert response.json()["error"].startswith("This server takes no REST inputs as binary data")
    assert len(response.content) < 300
    # Its log lines (its refusal, KServe's trace) show the path with its line break escaped.
    forged = edit_predictor.infer_url.replace("/infer", "%0AFORGED/infer")
    headers = {contract.BINARY_HEADER_LENGTH: "1"}
    assert httpx.post(forged, content=b"x", headers=headers).status_code == 400
    assert "\nFORGED" not in edit_predictor.log()
    # Nor in the traceback of an error that names it (KServe's ModelNotFound).
    unknown = f"{edit_predictor.url}/v2/models/nope%0AFORGED-IN-A-TRACEBACK/ready"
    assert httpx.get(unknown).status_code == 404
    assert "\nFORGED-IN-A-TRACEBACK" not in edit_predictor.log()
    assert "nope\\nFORGED-IN-A-TRACEBACK does not exist" in edit_predictor.log()
    assert "qwen-image-edit\\nFORGED/infer: its inputs came as binary data" in edit_predictor.log()
    assert edit(edit_predictor, image, **FAST).status_code == 200
