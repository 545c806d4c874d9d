"""Translation between OpenAI image requests and the predictors' v2 contract."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import get_args

import pybase64
from starlette.datastructures import UploadFile

from openai_adapter.errors import (
    IMAGE_TOO_LARGE,
    INVALID_IMAGE_FORMAT,
    INVALID_VALUE,
    MISSING_PARAMETER,
    UNSUPPORTED_VALUE,
    bad_request,
    model_not_found,
    unusable_answer,
)
from openai_adapter.image_urls import (
    DATA_URL_HINT,
    ImageUrlReader,
    ImageUrlRefused,
    ImageUrlUnreadable,
)
from openai_adapter.media import describe_image, detect_image_format
from openai_adapter.predictor_client import PredictorClient
from openai_adapter.protocol import (
    ImageCompletedEvent,
    ImageData,
    ImageEditJsonRequest,
    ImageEditRequest,
    ImageEvent,
    ImageGenerationRequest,
    ImagePartialEvent,
    ImageQuality,
    ImageReference,
    ImageRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    Quality,
)
from openai_adapter.settings import Settings
from predictors.contract import (
    HEIGHT,
    IMAGE,
    NUM_IMAGES,
    NUM_INFERENCE_STEPS,
    WIDTH,
    ImageResult,
    PartialImage,
    rest_body_parts,
)

OWNER = "qwen-image-serve"
# OpenAI's own limit on the images of one edit; the predictor applies the model's.
MAX_EDIT_IMAGES = 16
# The prefixes of the two endpoints' server-sent event types.
GENERATION_EVENTS = "image_generation"
EDIT_EVENTS = "image_edit"

# A request's answer: one body, or (``stream: true``) its events, not started.
Answer = ImagesResponse | AsyncIterator[ImageEvent]


@dataclass(frozen=True)
class PredictorCall:
    """A v2 infer call: its model, request id and deadline, JSON body in parts
    (``contract.rest_body_parts``), and the client's names of the contract's fields."""

    model: str
    request_id: str
    deadline: float  # event loop time (``middleware.request_deadline``)
    body: list[bytes]
    param_names: dict[str, str]
    previews: bool  # made through the predictor's ``infer_stream``
    quality: ImageQuality | None  # what the answer reports (``_reported_quality``)

    @property
    def infer_args(self) -> tuple[str, list[bytes], str, dict[str, str], float]:
        """The call as ``PredictorClient.infer``'s (and ``infer_stream``'s) arguments."""
        return self.model, self.body, self.request_id, self.param_names, self.deadline


class ImageService:
    """Serves the OpenAI image endpoints with the configured predictors."""

    def __init__(self, settings: Settings, client: PredictorClient, image_urls: ImageUrlReader):
        self._settings = settings
        self._client = client
        self._image_urls = image_urls
        self._created = int(time.time())

    @property
    def model_ids(self) -> list[str]:
        """The ids of the enabled models."""
        return self._settings.models

    async def not_ready(self) -> dict[str, str]:
        """The enabled models whose predictors are not ready, with the reason."""
        return await self._client.not_ready_models(self._settings.models)

    def models(self) -> ModelList:
        """The enabled models."""
        return ModelList(data=[self.model(model) for model in self._settings.models])

    def model(self, model: str) -> ModelCard:
        """One enabled model, by its id or an alias, or a 404."""
        if self._served_as(model) is None:
            raise model_not_found(model)
        return ModelCard(id=model, created=self._created, owned_by=OWNER)

    async def generate(
        self, request: ImageGenerationRequest, request_id: str, deadline: float
    ) -> Answer:
        """``POST /v1/images/generations``, answered by ``deadline`` (event loop time)."""
        model = self._resolve_model(request.model, self._settings.generation_model)
        _reject_unsupported(request)
        call = self._predictor_call(model, request, request_id, deadline)
        return await self._run(call, request, GENERATION_EVENTS)

    async def edit(
        self, request: ImageEditRequest | ImageEditJsonRequest, request_id: str, deadline: float
    ) -> Answer:
        """``POST /v1/images/edits``: a multipart form or a JSON object, answered by
        ``deadline`` (event loop time)."""
        model = self._resolve_model(request.model, self._settings.edit_model)
        _reject_unsupported(request)  # before any image URL is fetched
        images, mask = await self._read_edit_inputs(request, deadline)
        call = self._predictor_call(
            model, request, request_id, deadline, images, mask, request.IMAGES_PARAM
        )
        # The call holds the files as base64; dropped here, they are not also held while the
        # predictor works (UploadBudgetMiddleware's budget assumes so).
        del images, mask
        return await self._run(call, request, EDIT_EVENTS)

    def _served_as(self, name: str) -> str | None:
        """The enabled model that ``name`` is the id or an alias of; None if none."""
        models = self._settings.models
        if name in models:
            return name
        return next((model for model in models if name in self._settings.aliases(model)), None)

    def _resolve_model(self, requested: str | None, endpoint_model: str) -> str:
        """The model to call: the endpoint's own, which ``requested`` may only name (by its
        id or one of its aliases)."""
        if not self._settings.predictor_url(endpoint_model):
            # Switched off: nothing serves this endpoint, whatever the request names.
            name = requested or endpoint_model
            detail = (
                ""
                if name == endpoint_model
                else f" for this endpoint, whose model '{endpoint_model}' is switched off"
            )
            raise model_not_found(name, detail)
        if requested is None or requested in self._settings.aliases(endpoint_model):
            requested = endpoint_model
        served = self._served_as(requested)
        if served is None:
            raise model_not_found(requested)
        if served != endpoint_model:
            raise bad_request(
                f"The model '{requested}' does not serve this endpoint; use '{endpoint_model}'",
                "model",
            )
        return served

    async def _read_edit_inputs(
        self, request: ImageEditRequest | ImageEditJsonRequest, deadline: float
    ) -> tuple[list[bytes], bytes | None]:
        """The edit's images in order and its mask, if any: each a PNG, JPEG or WebP file (the
        mask PNG or WebP), all together within the upload limit, and the image URLs among
        them fetched one after another within one time limit for all, and by the request's
        ``deadline``. How many images the model edits from, and whether the mask fits its
        image, are the predictor's to say."""
        images_param = request.IMAGES_PARAM
        sources = request.images
        if not sources:
            raise bad_request(
                f"Missing required parameter: '{images_param}'", images_param, MISSING_PARAMETER
            )
        if len(sources) > MAX_EDIT_IMAGES:
            raise bad_request(
                f"At most {MAX_EDIT_IMAGES} images can be edited together, got {len(sources)}",
                images_param,
                INVALID_VALUE,
            )
        names = (
            ["The image"]
            if len(sources) == 1
            else [f"Image {number} of {len(sources)}" for number in range(1, len(sources) + 1)]
        )
        inputs = [(images_param, name, source) for name, source in zip(names, sources, strict=True)]
        together = "The images together are"
        if request.mask is not None:
            inputs.append(("mask", "The mask", request.mask))
            together = "The image files and the mask together are"
        limit = self._settings.max_upload_bytes
        room = limit
        fetched_by = self._image_urls.deadline(deadline)
        read: list[bytes] = []
        for param, name, source in inputs:
            data = await self._read_input(source, room + 1, fetched_by, param, name)
            if len(data) > room:
                what = "The image is" if len(inputs) == 1 else together
                raise bad_request(f"{what} larger than {limit} bytes", param, IMAGE_TOO_LARGE)
            image_format = detect_image_format(data)
            if param == "mask" and image_format in (None, "jpeg"):
                raise bad_request(
                    "The mask must be a PNG or WebP file: its fully transparent pixels mark the "
                    "area to edit, and a JPEG has no transparency",
                    param,
                    INVALID_IMAGE_FORMAT,
                )
            if image_format is None:
                raise bad_request(
                    f"{name} must be a PNG, JPEG or WebP file", param, INVALID_IMAGE_FORMAT
                )
            read.append(data)
            room -= len(data)
        if request.mask is not None:
            return read[:-1], read[-1]
        return read, None

    async def _read_input(
        self,
        source: UploadFile | ImageReference,
        max_bytes: int,
        deadline: float,
        param: str,
        name: str,
    ) -> bytes:
        """The bytes of an edit's input, at most ``max_bytes`` of an upload or a fetched URL:
        an uploaded file's, or those of a JSON edit's ``image_url``, fetched by ``deadline``
        (``ImageUrlReader.deadline``)."""
        if not isinstance(source, ImageReference):
            data = await source.read(max_bytes)
            # A file of up to 1 MiB is spooled in memory: closed, it is not held beside its
            # base64 until the form is closed after the answer.
            await source.close()
            return data
        if source.image_url is None:
            raise bad_request(
                f"{name} is given by file_id, and this server has no Files API: "
                f"{DATA_URL_HINT} in image_url",
                param,
                UNSUPPORTED_VALUE,
            )
        url = source.image_url
        # The request lives until the answer; taken out of it, a data URL (the image itself,
        # in base64) is not held beside the base64 sent on while the predictor works.
        source.image_url = ""
        try:
            return await self._image_urls.read(url, max_bytes, deadline)
        except ImageUrlRefused as refused:
            raise bad_request(f"{name}'s image_url {refused}", param, UNSUPPORTED_VALUE) from None
        except ImageUrlUnreadable as unreadable:
            raise bad_request(f"{name}'s image_url {unreadable}", param, INVALID_VALUE) from None

    def _predictor_call(
        self,
        model: str,
        request: ImageRequest,
        request_id: str,
        deadline: float,
        images: Sequence[bytes] = (),
        mask: bytes | None = None,
        images_param: str = IMAGE,
    ) -> PredictorCall:
        """The v2 infer call to ``model`` for the request's fields; ``images_param`` is the
        client's field that carried the images."""
        size = request.size_pixels or (None, None)
        quality_table = self._settings.quality_table(model)
        quality_steps = quality_table.get(request.quality or "auto")
        width = _first(request.width, size[0])
        height = _first(request.height, size[1])
        steps = _first(request.num_inference_steps, quality_steps)
        # Where each contract field came from, so that a predictor's 400 names the client's field.
        param_names = {
            IMAGE: images_param,
            NUM_IMAGES: "n",
            WIDTH: "size" if request.width is None and size[0] is not None else WIDTH,
            HEIGHT: "size" if request.height is None and size[1] is not None else HEIGHT,
            NUM_INFERENCE_STEPS: "quality"
            if request.num_inference_steps is None and quality_steps is not None
            else NUM_INFERENCE_STEPS,
        }
        # Previews come as server-sent events, whose lines carry JSON, not binary outputs.
        previews = bool(request.stream and request.partial_images)
        body = rest_body_parts(
            request.prompt,
            negative_prompt=request.negative_prompt,
            images=images,
            mask=mask,
            request_id=request_id,
            binary_output=not previews,
            width=width,
            height=height,
            num_inference_steps=steps,
            true_cfg_scale=request.true_cfg_scale,
            seed=request.seed,
            num_images=request.n,
            output_format=request.output_format,
            output_compression=request.output_compression,
            partial_images=request.partial_images if previews else None,
        )
        quality = _reported_quality(quality_table, steps, request.quality)
        return PredictorCall(model, request_id, deadline, body, param_names, previews, quality)

    async def _run(self, call: PredictorCall, request: ImageRequest, events: str) -> Answer:
        """Make the predictor call and answer in OpenAI's shape: one body, or for ``stream:
        true`` server-sent events of the ``events`` endpoint's types."""
        if request.stream:
            return self._events(call, request, events)
        results = await self._client.infer(*call.infer_args)
        return _images_response(results, call.quality, request.effective_safety_identifier)

    async def _events(
        self, call: PredictorCall, request: ImageRequest, events: str
    ) -> AsyncIterator[ImageEvent]:
        """A streamed answer: the previews that ``partial_images`` asks for as the predictor
        makes them, then one completed event per image."""
        args = call.infer_args
        if call.previews:
            answers = self._client.infer_stream(*args)
        else:
            answers = _once(self._client.infer(*args))
        # Closed at once when the client leaves: that closes the call to the predictor.
        async with contextlib.aclosing(answers):
            async for answer in answers:
                if isinstance(answer, PartialImage):
                    yield _partial_event(answer, f"{events}.partial_image", call.quality)
                    continue
                response = _images_response(
                    answer, call.quality, request.effective_safety_identifier
                )
                for event in _completed_events(response, f"{events}.completed"):
                    yield event


def _reported_quality(
    table: Mapping[str, int], steps: int | None, requested: Quality | None
) -> ImageQuality | None:
    """The quality an answer reports: the level of the quality ``table`` (quality -> steps)
    whose steps made its images, the ``requested`` one where several have them; None where
    the steps are the predictor's default (not known here) or no level's."""
    levels: tuple[ImageQuality, ...] = get_args(ImageQuality)
    matching = [level for level in levels if steps is not None and table.get(level) == steps]
    return requested if requested in matching else next(iter(matching), None)


def _reject_unsupported(request: ImageRequest) -> None:
    """Clear 400s for the OpenAI features that this service does not offer yet."""
    unsupported = _unsupported(request)
    if unsupported is not None:
        message, param = unsupported
        raise bad_request(message, param, UNSUPPORTED_VALUE)


def _unsupported(request: ImageRequest) -> tuple[str, str] | None:
    """The message and field of the first OpenAI feature that ``request`` asks for and this
    service does not offer, or None."""
    if request.response_format == "url":
        return "response_format 'url' is not supported yet; use 'b64_json'", "response_format"
    if request.background == "transparent":
        return "background 'transparent' is not supported; use 'opaque' or 'auto'", "background"
    if request.output_format in ("gif", "svg"):
        return (
            f"output_format '{request.output_format}' is not supported; use 'png', 'jpeg' or "
            "'webp'",
            "output_format",
        )
    for field in ("frame_count", "frame_duration_ms"):
        if getattr(request, field) is not None:
            return f"{field} is for GIF output, which this server does not make", field
    if request.svg is not None:
        return "svg is for SVG output, which this server does not make", "svg"
    if isinstance(request, ImageEditRequest) and request.markup is not None:
        return (
            "markup is not supported; to repaint part of the first image, send a mask whose "
            "fully transparent pixels mark the area",
            "markup",
        )
    return None


def _completed_events(response: ImagesResponse, event_type: str) -> list[ImageCompletedEvent]:
    """The answer of a streamed request (``stream: true``): one completed event per image."""
    return [
        ImageCompletedEvent(
            type=event_type,
            b64_json=image.b64_json,
            created_at=response.created,
            size=response.size,
            quality=response.quality or "auto",
            background=response.background,
            output_format=response.output_format,
            seed=image.seed,
            safety_identifier=response.safety_identifier,
        )
        for image in response.data
    ]


def _partial_event(
    preview: PartialImage, event_type: str, quality: ImageQuality | None
) -> ImagePartialEvent:
    described = describe_image(preview.data)
    if described is None:
        raise unusable_answer("The predictor returned no usable preview")
    output_format, width, height = described
    return ImagePartialEvent(
        type=event_type,
        b64_json=pybase64.b64encode_as_string(preview.data),
        created_at=int(time.time()),
        size=f"{width}x{height}",
        quality=quality or "auto",
        background="opaque",
        output_format=output_format,
        partial_image_index=preview.partial_image_index,
        seed=preview.seed,
    )


async def _once(results: Awaitable[list[ImageResult]]) -> AsyncIterator[list[ImageResult]]:
    yield await results


def _first(*values: int | None) -> int | None:
    return next((value for value in values if value is not None), None)


def _images_response(
    results: list[ImageResult], quality: ImageQuality | None, safety_identifier: str | None
) -> ImagesResponse:
    described = describe_image(results[0].data) if results else None
    if described is None:
        raise unusable_answer("The predictor returned no usable image")
    output_format, width, height = described
    return ImagesResponse(
        created=int(time.time()),
        data=[
            ImageData(b64_json=pybase64.b64encode_as_string(r.data), seed=r.seed) for r in results
        ],
        output_format=output_format,
        size=f"{width}x{height}",
        quality=quality,
        background="opaque",
        safety_identifier=safety_identifier,
    )
