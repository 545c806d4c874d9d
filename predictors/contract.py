"""The KServe v2 (Open Inference Protocol) contract of the two predictors.

This module is the single source of tensor names, parameter names, defaults and limits for
both halves of the project: the predictors parse requests with it and the OpenAI adapter
builds requests with it. It imports neither torch nor diffusers.

Request (``POST /v2/models/{model}/infer``)::

    inputs:
      prompt           BYTES [1]   UTF-8 text, required, not blank, at most 32000 characters
      negative_prompt  BYTES [1]   UTF-8 text, optional (generation "", edit " "), as long
      image            BYTES [N]   edit only, required: N encoded PNG/JPEG/WebP files, 1 to
                                   --max_input_images (more than one for the pipeline of
                                   Qwen-Image-Edit-2509 and later only)
      mask             BYTES [1]   edit only, optional: a PNG/WebP of the first image's size
                                   whose fully transparent pixels (alpha 0) mark the area to
                                   repaint, as OpenAI's; the output then keeps that image's
                                   aspect ratio at ~1024x1024 (width/height may only repeat it)
    parameters (all optional):
      width, height        int     multiples of 16 (generation 1664x928; edit follows the
                                   input image's aspect ratio at ~1024x1024 when absent)
      num_inference_steps  int     default 50
      true_cfg_scale       float   default 4.0 (gRPC carries no floats: a decimal string is
                                   accepted too)
      seed                 int     default 42; image i uses seed + i
      num_images           int     default 1
      output_format        string  png (default), jpeg or webp
      output_compression   int     0-100, quality for jpeg/webp (default 90)
      partial_images       int     0-3 (default 0): previews of each image to stream while
                                   it is made; read by ``infer_stream`` only

Response::

    outputs:
      images  BYTES [num_images]  encoded image files in ``output_format``
      seeds   INT64 [num_images]  the seed used for each image

Streaming (``POST /v2/models/{model}/infer_stream``, this project's extension of v2): the
same request, answered with server-sent events. ``partial_image`` events come first, each
a v2 response (JSON) whose ``images`` output holds one preview, at most
``partial_images`` per image, with the parameters ``image_index`` (which image of the
request), ``partial_image_index`` (0, 1, ... per image) and ``seed``; then one
``completed`` event, the whole v2 response as ``/infer`` gives it in JSON. A request
refused before its run starts gets the status and body ``/infer`` would give; a failure
after the stream has begun ends it with an ``error`` event, ``{"error": message,
"status": code}``.

Over REST the JSON body cannot carry raw bytes, so BYTES image tensors (``image`` in,
``images`` out) hold base64 text; over gRPC they hold the raw file bytes. Text tensors are
plain UTF-8 in both. A REST client may ask for KServe's binary outputs (parameter
``binary_data_output: true``): the response is then the JSON header followed by the raw
``images`` tensor, each element a 4-byte little-endian length and the file bytes, with the
header's length in the ``inference-header-content-length`` HTTP header. The OpenAI adapter
uses it: it halves the hop's time against base64 (see README, "Choosing the transport").
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pybase64
import pydantic_core

GENERATION_MODEL_NAME = "qwen-image"
EDIT_MODEL_NAME = "qwen-image-edit"

# Input tensors.
PROMPT = "prompt"
NEGATIVE_PROMPT = "negative_prompt"
IMAGE = "image"
MASK = "mask"

# Output tensors.
IMAGES = "images"
SEEDS = "seeds"

# Request parameters.
WIDTH = "width"
HEIGHT = "height"
NUM_INFERENCE_STEPS = "num_inference_steps"
TRUE_CFG_SCALE = "true_cfg_scale"
SEED = "seed"
NUM_IMAGES = "num_images"
OUTPUT_FORMAT = "output_format"
OUTPUT_COMPRESSION = "output_compression"
PARTIAL_IMAGES = "partial_images"
BINARY_DATA_OUTPUT = "binary_data_output"  # KServe's REST binary extension
BINARY_HEADER_LENGTH = "inference-header-content-length"

# Response parameters of a streamed preview, and the stream's event names.
IMAGE_INDEX = "image_index"
PARTIAL_IMAGE_INDEX = "partial_image_index"
PARTIAL_IMAGE_EVENT = "partial_image"
COMPLETED_EVENT = "completed"
ERROR_EVENT = "error"
MAX_PARTIAL_IMAGES = 3  # OpenAI's limit

OUTPUT_FORMATS = ("png", "jpeg", "webp")
SIZE_MULTIPLE = 16
# OpenAI's limit on a prompt; the limit keeps megabytes of text off the tokenizer. Of a
# prompt, generation and edit alike use the first 512 tokens (about 2000 characters of
# English; ``denoise.MAX_SEQUENCE_LENGTH``), an edit's image tokens coming on top.
MAX_PROMPT_CHARACTERS = 32000
MAX_SEED = 2**63 - 1 - 1024  # leaves room for seed + i in an INT64


@dataclass(frozen=True)
class Defaults:
    """Default values of one predictor's request fields (those of the original service)."""

    width: int | None
    height: int | None
    negative_prompt: str
    num_inference_steps: int = 50
    true_cfg_scale: float = 4.0
    seed: int = 42
    num_images: int = 1
    output_format: str = "png"
    output_compression: int = 90


GENERATION_DEFAULTS = Defaults(width=1664, height=928, negative_prompt="")
EDIT_DEFAULTS = Defaults(width=None, height=None, negative_prompt=" ")


@dataclass(frozen=True)
class Limits:
    """What a predictor accepts. The sizes, ``max_steps``, ``max_images``,
    ``max_input_images`` and ``max_input_pixels`` are set per deployment (flags); the other
    bounds are fixed."""

    min_size: int = 256
    max_size: int = 2048
    # One step is not allowed: Qwen-Image's scheduler stretches its sigmas to a terminal
    # shift, which divides by zero with a single step and yields NaN images.
    min_steps: int = 2
    max_steps: int = 100
    min_cfg_scale: float = 1.0
    max_cfg_scale: float = 20.0
    max_images: int = 10
    # Qwen-Image-Edit-2509's authors give 1 to 3 input images as its best range.
    max_input_images: int = 3
    max_input_pixels: int = 4096 * 4096

    def __post_init__(self) -> None:
        ranges = (
            ("size", self.min_size, self.max_size),
            ("steps", self.min_steps, self.max_steps),
            ("CFG scale", self.min_cfg_scale, self.max_cfg_scale),
        )
        for what, least, most in ranges:
            if least > most:
                raise ValueError(f"the least {what} ({least}) is above the most ({most})")
        if (
            self.min_size < SIZE_MULTIPLE
            or min(self.max_images, self.max_input_images, self.max_input_pixels) < 1
        ):
            raise ValueError(
                f"sizes start at {SIZE_MULTIPLE}, and image counts and pixel limits at 1"
            )


@dataclass
class ImageRequest:
    """A validated request, in the terms of the contract (no transport details)."""

    prompt: str
    negative_prompt: str
    width: int | None
    height: int | None
    num_inference_steps: int
    true_cfg_scale: float
    seed: int
    num_images: int
    output_format: str
    output_compression: int
    partial_images: int = 0
    images: tuple[bytes, ...] = field(default=(), repr=False)
    mask: bytes | None = field(default=None, repr=False)

    @property
    def seeds(self) -> list[int]:
        """The seed of each image: ``seed + i`` for image ``i``."""
        return [self.seed + i for i in range(self.num_images)]


class ContractError(ValueError):
    """A request that breaks the contract; the predictor answers it with HTTP 400.

    Every message starts with the quoted name of the offending field (``'width' must ...``),
    so that a client can point at it: see ``error_param``.
    """

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


_PARAM_PREFIX = re.compile(r"^'([a-z_]+)'")


def error_param(message: str) -> str | None:
    """The contract field a predictor's 400 message is about, if it names one."""
    match = _PARAM_PREFIX.match(message)
    return match.group(1) if match else None


def describe_invalid_body(errors: Sequence[dict[str, Any]]) -> str:
    """The message for a JSON body that KServe's v2 request model refuses (pydantic's
    ``errors``): a parameter's starts with its quoted name, as ``ContractError``'s do."""
    error = errors[0]
    if error["type"] == "json_invalid":
        return f"The body is not a v2 inference request: {error['msg']}"
    path = list(error["loc"])
    for wrapper in ("body", "InferenceRequest"):  # FastAPI's, then the model of a union's
        if path[:1] == [wrapper]:
            path.pop(0)
    if len(path) >= 2 and path[0] == "parameters":
        return f"'{path[1]}' must be a number, a string or a boolean"
    where = ".".join(str(part) for part in path) or "the body"
    return f"The body is not a v2 inference request: {where}: {error['msg']}"


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ContractError(name, f"'{name}' must be an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ContractError(name, f"'{name}' must be an integer, got {value!r}")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ContractError(name, f"'{name}' must be a number, got a boolean")
    if isinstance(value, float):
        return value
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:  # JSON integers have no bound
            raise ContractError(
                name, f"'{name}' is out of range: got an integer of {value.bit_length()} bits"
            ) from None
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ContractError(name, f"'{name}' must be a number, got {value!r}")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ContractError(name, f"'{name}' must be between {low} and {high}, got {value}")


def validate_request(
    *,
    prompt: str | None,
    negative_prompt: str | None,
    parameters: dict[str, Any],
    defaults: Defaults,
    limits: Limits,
    images: Sequence[bytes] = (),
    mask: bytes | None = None,
    needs_image: bool = False,
) -> ImageRequest:
    """Apply defaults and limits to raw request fields; raise ``ContractError`` on bad input."""
    if prompt is None or not prompt.strip():
        raise ContractError(PROMPT, "'prompt' must be a non-empty string")
    for name, text in ((PROMPT, prompt), (NEGATIVE_PROMPT, negative_prompt or "")):
        if len(text) > MAX_PROMPT_CHARACTERS:
            raise ContractError(
                name, f"'{name}' has {len(text)} characters; at most {MAX_PROMPT_CHARACTERS}"
            )
    if needs_image and not any(images):
        raise ContractError(IMAGE, "'image' is required: send the image to edit")
    if mask is not None and not mask:
        raise ContractError(MASK, "'mask' is empty")
    if len(images) > limits.max_input_images:
        raise ContractError(
            IMAGE,
            f"'image' holds {len(images)} images; this deployment edits from at most "
            f"{limits.max_input_images}",
        )

    def get_int(name: str, default: int | None) -> int | None:
        value = parameters.get(name)
        return default if value is None else _as_int(name, value)

    width = get_int(WIDTH, defaults.width)
    height = get_int(HEIGHT, defaults.height)
    if (width is None) != (height is None):
        missing = WIDTH if width is None else HEIGHT
        raise ContractError(missing, f"'{missing}' is required when the other side is given")
    for name, value in ((WIDTH, width), (HEIGHT, height)):
        if value is None:
            continue
        if value % SIZE_MULTIPLE:
            raise ContractError(
                name, f"'{name}' must be a multiple of {SIZE_MULTIPLE}, got {value}"
            )
        _check_range(name, value, limits.min_size, limits.max_size)

    steps = get_int(NUM_INFERENCE_STEPS, defaults.num_inference_steps)
    _check_range(NUM_INFERENCE_STEPS, steps, limits.min_steps, limits.max_steps)

    cfg_raw = parameters.get(TRUE_CFG_SCALE)
    cfg = defaults.true_cfg_scale if cfg_raw is None else _as_float(TRUE_CFG_SCALE, cfg_raw)
    _check_range(TRUE_CFG_SCALE, cfg, limits.min_cfg_scale, limits.max_cfg_scale)

    seed = get_int(SEED, defaults.seed)
    _check_range(SEED, seed, 0, MAX_SEED)

    num_images = get_int(NUM_IMAGES, defaults.num_images)
    _check_range(NUM_IMAGES, num_images, 1, limits.max_images)

    output_format = str(parameters.get(OUTPUT_FORMAT) or defaults.output_format).lower()
    if output_format == "jpg":
        output_format = "jpeg"
    if output_format not in OUTPUT_FORMATS:
        raise ContractError(
            OUTPUT_FORMAT, f"'output_format' must be one of {', '.join(OUTPUT_FORMATS)}"
        )
    compression = get_int(OUTPUT_COMPRESSION, defaults.output_compression)
    _check_range(OUTPUT_COMPRESSION, compression, 0, 100)
    partial_images = get_int(PARTIAL_IMAGES, 0)
    _check_range(PARTIAL_IMAGES, partial_images, 0, MAX_PARTIAL_IMAGES)

    return ImageRequest(
        prompt=prompt,
        negative_prompt=defaults.negative_prompt if negative_prompt is None else negative_prompt,
        width=width,
        height=height,
        num_inference_steps=steps,
        true_cfg_scale=cfg,
        seed=seed,
        num_images=num_images,
        output_format=output_format,
        output_compression=compression,
        partial_images=partial_images,
        images=tuple(images),
        mask=mask,
    )


def encode_bytes_for_rest(data: bytes) -> str:
    """Base64 text for a BYTES image tensor in a REST JSON body (pybase64: the standard
    library's codec takes milliseconds per megabyte)."""
    return pybase64.b64encode_as_string(data)


def decode_bytes_from_rest(name: str, value: object) -> bytes:
    """Raw bytes of a base64 BYTES image tensor from a REST JSON body."""
    if not isinstance(value, str | bytes):
        raise ContractError(
            name, f"'{name}' must be a base64-encoded string over REST, got {type(value).__name__}"
        )
    try:
        return pybase64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ContractError(name, f"'{name}' must be base64-encoded over REST") from exc


def build_parameters(
    *,
    width: int | None = None,
    height: int | None = None,
    num_inference_steps: int | None = None,
    true_cfg_scale: float | None = None,
    seed: int | None = None,
    num_images: int | None = None,
    output_format: str | None = None,
    output_compression: int | None = None,
    partial_images: int | None = None,
    for_grpc: bool = False,
) -> dict[str, Any]:
    """Request parameters for the fields that are set (gRPC carries floats as strings)."""
    params: dict[str, Any] = {
        WIDTH: width,
        HEIGHT: height,
        NUM_INFERENCE_STEPS: num_inference_steps,
        TRUE_CFG_SCALE: str(true_cfg_scale) if for_grpc and true_cfg_scale else true_cfg_scale,
        SEED: seed,
        NUM_IMAGES: num_images,
        OUTPUT_FORMAT: output_format,
        OUTPUT_COMPRESSION: output_compression,
        PARTIAL_IMAGES: partial_images,
    }
    return {key: value for key, value in params.items() if value is not None}


def build_rest_body(
    prompt: str,
    *,
    negative_prompt: str | None = None,
    images: Sequence[bytes] = (),
    mask: bytes | None = None,
    request_id: str | None = None,
    binary_output: bool = False,
    **parameters: Any,
) -> dict[str, Any]:
    """A v2 REST infer body (JSON-ready dict) following this contract.

    With ``binary_output`` the images come back raw (``parse_rest_binary_response``).
    """
    inputs: list[dict[str, Any]] = [_text_input(PROMPT, prompt)]
    if negative_prompt is not None:
        inputs.append(_text_input(NEGATIVE_PROMPT, negative_prompt))
    for name, files in _file_inputs(images, mask):
        inputs.append(
            {
                **_file_input_header(name, files),
                "data": [encode_bytes_for_rest(data) for data in files],
            }
        )
    body: dict[str, Any] = {"inputs": inputs, "parameters": build_parameters(**parameters)}
    if binary_output:
        body["parameters"][BINARY_DATA_OUTPUT] = True
    if request_id:
        body["id"] = request_id
    return body


def rest_body_parts(
    prompt: str, *, images: Sequence[bytes] = (), mask: bytes | None = None, **fields: Any
) -> list[bytes]:
    """The JSON of ``build_rest_body(prompt, images=images, mask=mask, **fields)``, in parts
    that join into it. Each file's base64 is a part of its own, encoded from the file's bytes:
    a large upload is then not copied again into one JSON document, and the caller may drop
    the files once this returns and send the parts as they are."""
    body = build_rest_body(prompt, **fields)
    parts = [b'{"inputs":', pydantic_core.to_json(body.pop("inputs"))[:-1]]  # without "]"
    for name, files in _file_inputs(images, mask):
        header = pydantic_core.to_json(_file_input_header(name, files))
        parts += [b",", header[:-1], b',"data":["']  # the header without its "}"
        for index, data in enumerate(files):
            if index:
                parts.append(b'","')
            parts.append(pybase64.b64encode(data))  # base64 needs no escaping in JSON
        parts.append(b'"]}')
    parts += [b"],", pydantic_core.to_json(body)[1:]]  # "parameters" and "id", without "{"
    return parts


def _file_inputs(images: Sequence[bytes], mask: bytes | None) -> list[tuple[str, list[bytes]]]:
    """The request's file tensors that have files: the images, then the mask."""
    tensors = [(IMAGE, list(images)), (MASK, [mask] if mask is not None else [])]
    return [(name, files) for name, files in tensors if files]


def _file_input_header(name: str, files: Sequence[bytes]) -> dict[str, Any]:
    return {"name": name, "shape": [len(files)], "datatype": "BYTES"}


def _text_input(name: str, text: str) -> dict[str, Any]:
    return {"name": name, "shape": [1], "datatype": "BYTES", "data": [text]}


@dataclass
class ImageResult:
    """One image of a response: the encoded file and the seed it was made with."""

    data: bytes
    seed: int


def parse_rest_response(body: dict[str, Any]) -> list[ImageResult]:
    """The images and seeds of a v2 REST infer response that follows this contract."""
    outputs = {output["name"]: output for output in body.get("outputs", [])}
    if IMAGES not in outputs or SEEDS not in outputs:
        raise ValueError(f"response lacks the '{IMAGES}' and '{SEEDS}' outputs")
    images = [decode_bytes_from_rest(IMAGES, item) for item in outputs[IMAGES]["data"]]
    return _results(images, outputs[SEEDS]["data"])


def parse_rest_binary_response(content: bytes | bytearray, header_length: int) -> list[ImageResult]:
    """The images and seeds of a v2 REST response with binary outputs.

    ``header_length`` is the ``inference-header-content-length`` HTTP header: the JSON
    header's size, after which the raw tensors follow in the order the header lists them.
    Each image is copied out of ``content`` once.
    """
    view = memoryview(content)
    header = json.loads(view[:header_length].tobytes())
    offset = header_length
    tensors: dict[str, Any] = {}
    for output in header.get("outputs", []):
        if "data" in output:
            tensors[output["name"]] = output["data"]
            continue
        size = output["parameters"]["binary_data_size"]
        tensors[output["name"]] = _binary_slice(view, offset, size)
        offset += size
    if IMAGES not in tensors or SEEDS not in tensors:
        raise ValueError(f"response lacks the '{IMAGES}' and '{SEEDS}' outputs")
    seeds = tensors[SEEDS]
    if isinstance(seeds, memoryview):
        seeds = [int(seed) for seed in np.frombuffer(seeds, dtype="<i8")]
    return _results(_split_bytes_tensor(tensors[IMAGES]), seeds)


def _binary_slice(view: memoryview, offset: int, size: int) -> memoryview:
    """``size`` bytes of ``view`` from ``offset``, no copy; ValueError where it ends sooner."""
    if offset + size > len(view):
        raise ValueError(f"response is cut short: {len(view)} bytes, {offset + size} expected")
    return view[offset : offset + size]


def _split_bytes_tensor(raw: memoryview) -> list[bytes]:
    """The elements of a serialized BYTES tensor: each a 4-byte little-endian length + data."""
    elements, offset = [], 0
    while offset < len(raw):
        size = int.from_bytes(_binary_slice(raw, offset, 4), "little")
        elements.append(_binary_slice(raw, offset + 4, size).tobytes())
        offset += 4 + size
    return elements


def _results(images: list[bytes], seeds: list[Any]) -> list[ImageResult]:
    if len(images) != len(seeds):
        raise ValueError("response has a different number of images and seeds")
    return [
        ImageResult(data=image, seed=int(seed)) for image, seed in zip(images, seeds, strict=True)
    ]


@dataclass
class PartialImage:
    """A preview of one image of a streamed request (an ``infer_stream`` event)."""

    data: bytes
    image_index: int
    partial_image_index: int
    seed: int


def parse_partial_image(body: dict[str, Any]) -> PartialImage:
    """The preview carried by a ``partial_image`` event's v2 response."""
    outputs = {output["name"]: output for output in body.get("outputs", [])}
    if IMAGES not in outputs:
        raise ValueError(f"partial image lacks the '{IMAGES}' output")
    (image,) = outputs[IMAGES]["data"]
    parameters = body.get("parameters") or {}
    return PartialImage(
        data=decode_bytes_from_rest(IMAGES, image),
        image_index=int(parameters[IMAGE_INDEX]),
        partial_image_index=int(parameters[PARTIAL_IMAGE_INDEX]),
        seed=int(parameters[SEED]),
    )
