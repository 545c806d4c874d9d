"""The v2 contract's validation and (de)serialisation, without a server."""

from __future__ import annotations

import base64
import itertools
import json

import pytest
from kserve import InferOutput, InferResponse

from predictors import contract
from predictors.contract import ContractError, Limits


def validate(parameters=None, defaults=contract.GENERATION_DEFAULTS, **fields):
    return contract.validate_request(
        prompt=fields.get("prompt", "a cat"),
        negative_prompt=fields.get("negative_prompt"),
        parameters=parameters or {},
        defaults=defaults,
        limits=Limits(),
        images=fields.get("images", ()),
        needs_image=fields.get("needs_image", False),
    )


def test_generation_defaults_are_the_original_services():
    request = validate()
    assert (request.width, request.height) == (1664, 928)
    assert request.negative_prompt == ""
    assert request.num_inference_steps == 50
    assert request.true_cfg_scale == 4.0
    assert request.seed == 42
    assert request.seeds == [42]
    assert request.output_format == "png"
    assert request.partial_images == 0


def test_partial_images_are_zero_to_three():
    assert validate({"partial_images": 3}).partial_images == 3
    with pytest.raises(ContractError, match=r"^'partial_images' must be between 0 and 3"):
        validate({"partial_images": 4})


def test_edit_defaults_follow_the_input_and_use_a_space_negative_prompt():
    request = validate(defaults=contract.EDIT_DEFAULTS, images=[b"png"], needs_image=True)
    assert (request.width, request.height) == (None, None)
    assert request.negative_prompt == " "


def test_an_edit_takes_up_to_max_input_images():
    three = validate(defaults=contract.EDIT_DEFAULTS, images=[b"a", b"b", b"c"], needs_image=True)
    assert three.images == (b"a", b"b", b"c")
    with pytest.raises(ContractError, match=r"^'image' holds 4 images; .* at most 3$"):
        validate(defaults=contract.EDIT_DEFAULTS, images=[b"a"] * 4, needs_image=True)
    with pytest.raises(ContractError, match=r"^'image' is required"):
        validate(defaults=contract.EDIT_DEFAULTS, images=[], needs_image=True)


def test_several_images_use_consecutive_seeds():
    assert validate({"seed": 5, "num_images": 3}).seeds == [5, 6, 7]


def test_grpc_style_strings_are_accepted_for_numbers():
    request = validate({"true_cfg_scale": "2.5", "num_inference_steps": "8", "seed": "7"})
    assert (request.true_cfg_scale, request.num_inference_steps, request.seed) == (2.5, 8, 7)


def test_jpg_is_taken_as_jpeg():
    assert validate({"output_format": "JPG"}).output_format == "jpeg"


@pytest.mark.parametrize(
    ("parameters", "param"),
    [
        ({"width": True}, "width"),
        ({"seed": 1.5}, "seed"),
        ({"true_cfg_scale": [4]}, "true_cfg_scale"),
        ({"num_images": 0}, "num_images"),
        ({"output_compression": 101}, "output_compression"),
        ({"partial_images": -1}, "partial_images"),
    ],
)
def test_errors_name_their_field_first(parameters, param):
    with pytest.raises(ContractError) as raised:
        validate(parameters)
    assert raised.value.param == param
    assert contract.error_param(raised.value.message) == param


def test_error_param_is_none_for_other_messages():
    assert contract.error_param("Server is busy: retry later") is None


def test_rest_body_round_trips_through_parameters_and_base64():
    body = contract.build_rest_body(
        "a cat",
        negative_prompt="blurry",
        images=[b"\x89PNG raw", b"\xff\xd8 second"],
        mask=b"\x89PNG mask",
        seed=3,
        width=512,
        height=256,
    )
    inputs = {item["name"]: item for item in body["inputs"]}
    assert inputs["prompt"]["data"] == ["a cat"]
    assert inputs["negative_prompt"]["data"] == ["blurry"]
    assert inputs["image"]["shape"] == [2]
    assert [contract.decode_bytes_from_rest("image", item) for item in inputs["image"]["data"]] == [
        b"\x89PNG raw",
        b"\xff\xd8 second",
    ]
    assert inputs["mask"]["shape"] == [1]
    assert contract.decode_bytes_from_rest("mask", inputs["mask"]["data"][0]) == b"\x89PNG mask"
    assert body["parameters"] == {"seed": 3, "width": 512, "height": 256}


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"negative_prompt": 'blurry, \u00e9\u2603 "quoted"', "request_id": "r-1", "seed": 3},
        {"images": [b"\x89PNG one"], "binary_output": True, "true_cfg_scale": 2.5},
        {"images": [b"\x89PNG one", b"", b"\xff\xd8 three"], "mask": b"\x89PNG mask"},
        {"mask": b"\x89PNG mask only", "width": 512, "height": 256},
    ],
)
def test_rest_body_parts_join_into_the_rest_body(fields):
    """The adapter sends ``rest_body_parts`` as they are: joined, they are the JSON of the
    same ``build_rest_body`` call, each file's base64 a part of its own."""
    parts = contract.rest_body_parts('a "cat"\n\u732b', **fields)
    assert json.loads(b"".join(parts)) == contract.build_rest_body('a "cat"\n\u732b', **fields)
    files = [*fields.get("images", ()), *([fields["mask"]] if "mask" in fields else [])]
    file_parts = [
        part for before, part in itertools.pairwise(parts) if before.endswith((b'["', b'","'))
    ]
    assert [base64.b64decode(part) for part in file_parts] == files


def test_grpc_parameters_carry_floats_as_strings():
    assert contract.build_parameters(true_cfg_scale=4.0, for_grpc=True) == {"true_cfg_scale": "4.0"}


def kserve_binary_response(images: list[bytes], seeds: list[int]) -> tuple[bytes, int]:
    """A v2 REST response with binary outputs as KServe serialises it, and its header length."""
    response = InferResponse(
        response_id="r1",
        model_name="qwen-image",
        infer_outputs=[
            InferOutput(contract.IMAGES, [len(images)], "BYTES", data=images),
            InferOutput(contract.SEEDS, [len(seeds)], "INT64", data=seeds),
        ],
        use_binary_outputs=True,
    )
    return response.to_rest()


@pytest.mark.parametrize("buffer", [bytes, bytearray], ids=["bytes", "bytearray"])
def test_binary_responses_parse_what_kserve_serialises(buffer):
    """As the adapter reads an answer (a bytearray) too, the seeds' raw INT64s included."""
    images = [b"\x89PNG first \x00\xff", b"\xff\xd8 second"]
    content, header_length = kserve_binary_response(images, [11, 12])
    assert b'"binary_data_size"' in content[:header_length]
    results = contract.parse_rest_binary_response(buffer(content), header_length)
    assert [(r.data, r.seed) for r in results] == [(images[0], 11), (images[1], 12)]
    assert all(type(r.data) is bytes for r in results)


def test_a_binary_response_cut_short_is_refused():
    content, header_length = kserve_binary_response([b"\x89PNG" + bytes(100)], [7])
    with pytest.raises(ValueError, match="cut short"):
        contract.parse_rest_binary_response(content[:-30], header_length)
