"""HTTP routes: parse the request, hand it to the image service, return its answer."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from openai_adapter.errors import (
    INVALID_API_KEY,
    INVALID_JSON,
    NOT_A_JSON_OBJECT,
    NOT_MULTIPART,
    NOT_READY,
    OpenAIError,
    stream_error,
)
from openai_adapter.middleware import request_deadline, request_id_of
from openai_adapter.protocol import (
    ErrorResponse,
    ImageCompletedEvent,
    ImageEditJsonRequest,
    ImageEditRequest,
    ImageEvent,
    ImageGenerationRequest,
    ImagePartialEvent,
    ImagesResponse,
    ModelCard,
    ModelList,
    StreamErrorEvent,
)
from openai_adapter.serving import Answer, ImageService
from predictors.contract import MAX_PROMPT_CHARACTERS
from predictors.disconnect import EventStreamResponse, server_sent_events

_Body = TypeVar("_Body", bound=BaseModel)
_Route = TypeVar("_Route", bound=Callable[..., Any])
_IMAGES_RESPONSE = TypeAdapter(ImagesResponse)
# The most '{' and '[' bytes (in strings too) a JSON edit body may hold. An edit has a few
# objects and arrays, and its texts up to 2 x MAX_PROMPT_CHARACTERS characters; but a body of
# 29 MB as a list of 1.8 million small objects took 5 s and 1.2 GB of memory to parse.
MAX_EDIT_JSON_STRUCTURES = 4 * MAX_PROMPT_CHARACTERS
_TOO_MANY_STRUCTURES = (
    f"The JSON body holds more than {MAX_EDIT_JSON_STRUCTURES} '{{' and '[': an edit has its "
    "prompt and a few images"
)
_bearer = HTTPBearer(auto_error=False, description="The adapter's API key, when one is set.")
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request",
        401: "Missing or wrong API key",
        404: "Unknown model",
        408: "Request body stalled",
        413: "Request body too large",
        500: "Inference failed",
        502: "Invalid answer from a predictor",
        503: "Predictor unreachable or busy (see Retry-After)",
        504: "Predictor timed out",
    }.items()
}


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse the request with a 401 unless it carries one of the configured API keys."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    if credentials is None:
        raise OpenAIError(
            401, "No API key in an 'Authorization: Bearer <key>' header", code=INVALID_API_KEY
        )
    sent = credentials.credentials.encode()
    # Every key is compared, so that the time taken does not tell which one nearly matched.
    matches = [secrets.compare_digest(sent, key.encode()) for key in keys]
    if not any(matches):
        raise OpenAIError(401, "Incorrect API key provided", code=INVALID_API_KEY)


def get_service(request: Request) -> ImageService:
    """The application's image service."""
    return request.app.state.service


Service = Annotated[ImageService, Depends(get_service)]


async def _answer(answer: Answer, request_id: str) -> Response:
    """One JSON body, or for ``stream: true`` server-sent events. A stream's first event is
    awaited here, so that a request that fails before it gets its error status and body
    rather than a stream.

    The body is large (the images' base64), so it is serialized in one pass straight to
    bytes: ``model_dump_json`` makes a str, which the response would encode once more."""
    if isinstance(answer, ImagesResponse):
        body = _IMAGES_RESPONSE.dump_json(answer, exclude_none=True)
        return Response(body, media_type="application/json")
    first = await anext(answer)

    def error_event(error: Exception) -> str:  # after the first event: the SDK raises it
        return _server_sent_event(stream_error(error, request_id))

    return EventStreamResponse(server_sent_events(first, answer, _server_sent_event, error_event))


def _server_sent_event(event: ImageEvent | StreamErrorEvent) -> str:
    """``event: <type>`` and ``data: <JSON>``. An error keeps its null fields, as error
    bodies do (``{"message", "type", "param", "code"}``)."""
    data = event.model_dump_json(exclude_none=not isinstance(event, StreamErrorEvent))
    return f"event: {event.type}\ndata: {data}\n\n"


_V1 = "/v1"
_GENERATIONS = "/images/generations"
_EDITS = "/images/edits"
# The image routes' full paths: generations have a body size limit of their own, and edits'
# bodies count against the upload bytes held at once.
GENERATIONS_PATH = _V1 + _GENERATIONS
EDITS_PATH = _V1 + _EDITS
v1 = APIRouter(prefix=_V1, dependencies=[Depends(require_api_key)], responses=_ERRORS)

# A form field's name with keys in brackets: ``svg[model]``, ``svg[reasoning][effort]``.
_NESTED_FORM_FIELD = re.compile(r"([^\[\]]+)((?:\[[^\[\]]+\])+)")
_FORM_KEY = re.compile(r"\[([^\[\]]+)\]")
_FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")
_JSON = "application/json"
_COMPONENT = "#/components/schemas/{model}"
_GENERATION_BODIES: dict[str, type[BaseModel]] = {_JSON: ImageGenerationRequest}
_EDIT_BODIES: dict[str, type[BaseModel]] = {
    "multipart/form-data": ImageEditRequest,
    _JSON: ImageEditJsonRequest,
}


_STREAM_EVENTS: tuple[type[BaseModel], ...] = (
    ImagePartialEvent,
    ImageCompletedEvent,
    StreamErrorEvent,
)


def route_schemas() -> dict[str, Any]:
    """The OpenAPI component schemas of the image routes' bodies and stream events, which
    FastAPI does not document: the routes read their bodies themselves, once the API key is
    checked, and stream their events."""
    schemas: dict[str, Any] = {}
    for model in (*_GENERATION_BODIES.values(), *_EDIT_BODIES.values(), *_STREAM_EVENTS):
        schema = model.model_json_schema(ref_template=_COMPONENT)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def _documented_body(bodies: dict[str, type[BaseModel]]) -> dict[str, Any]:
    """The ``openapi_extra`` of a route that reads ``bodies`` (media type -> model) itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                media_type: {"schema": {"$ref": _COMPONENT.format(model=model.__name__)}}
                for media_type, model in bodies.items()
            },
        }
    }


def _image_route(path: str, bodies: dict[str, type[BaseModel]]) -> Callable[[_Route], _Route]:
    """The decorator of an image route at ``path`` that reads ``bodies`` itself."""
    events = [{"$ref": _COMPONENT.format(model=model.__name__)} for model in _STREAM_EVENTS]
    return v1.post(
        path,
        response_model=ImagesResponse,
        responses={
            200: {
                "description": "The images; with stream: true, server-sent events",
                "content": {"text/event-stream": {"schema": {"oneOf": events}}},
            }
        },
        tags=["images"],
        openapi_extra=_documented_body(bodies),
    )


def _media_type(request: Request) -> str:
    """The request's media type, in lower case and without its parameters."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _json_body(model: type[_Body], body: bytes | bytearray) -> _Body:
    """A JSON body as ``model``; answered as FastAPI answers its own bodies when it does
    not fit (``_as_request_error``)."""
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "missing"}])
    try:
        return model.model_validate_json(body)
    except ValidationError as invalid:
        raise _as_request_error(invalid) from None


def _form_body(model: type[_Body], form: FormData, list_fields: tuple[str, ...]) -> _Body:
    """A form as ``model``. As FastAPI reads a form: a field sent more than once gives its
    last value, or all of them for ``list_fields``, and empty fields (a blank text field, a
    file input with no file chosen) count as not sent."""
    fields: dict[str, Any] = {}
    for name in form:
        values = [value for value in form.getlist(name) if not _is_blank(value)]
        if values:
            _set_form_field(fields, name, values if name in list_fields else values[-1])
    try:
        return model.model_validate(fields)
    except ValidationError as invalid:
        raise _as_request_error(invalid) from None


def _set_form_field(fields: dict[str, Any], name: str, value: Any) -> None:
    """Set a form field in ``fields``; a name with keys in brackets (``svg[reasoning][effort]``,
    as the openai SDK sends an object's fields in a form) sets a value in nested objects."""
    match = _NESTED_FORM_FIELD.fullmatch(name)
    keys = [match[1], *_FORM_KEY.findall(match[2])] if match else [name]
    target = fields
    for key in keys[:-1]:
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    target[keys[-1]] = value


def _as_request_error(invalid: ValidationError) -> RequestValidationError:
    """A model's validation errors as FastAPI's for a request body, which
    ``errors.install_error_handlers`` answers in OpenAI's shape."""
    errors = invalid.errors(include_url=False)
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors])


async def _uncached_body(request: Request) -> bytearray:
    """The request's body, which, unlike ``request.body()``, the request does not keep: an
    edit's JSON body (its images' data URLs) is then not held beside what it is parsed into
    while the predictor works."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


def _is_blank(value: str | StarletteUploadFile) -> bool:
    if isinstance(value, str):
        return value == ""
    return value.filename == "" and value.size == 0


async def generation_request(request: Request) -> ImageGenerationRequest:
    """The generation's JSON body, read as FastAPI reads one (a body with no content type
    counts as JSON), but only once the router's API key check has passed."""
    body = await request.body()
    media_type = _media_type(request)
    is_json = media_type in ("", _JSON) or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )
    if body and not is_json:
        raise OpenAIError(400, NOT_A_JSON_OBJECT, code=INVALID_JSON)
    return _json_body(ImageGenerationRequest, body)


@_image_route(_GENERATIONS, _GENERATION_BODIES)
async def create_image(
    body: Annotated[ImageGenerationRequest, Depends(generation_request)],
    request: Request,
    service: Service,
) -> Response:
    """Create images from a prompt (OpenAI ``images.generate``)."""
    request_id = request_id_of(request)
    answer = await service.generate(body, request_id, request_deadline(request))
    return await _answer(answer, request_id)


async def edit_request(request: Request) -> AsyncIterator[ImageEditRequest | ImageEditJsonRequest]:
    """The edit in either of OpenAI's bodies: a multipart form with the images as files, as
    the openai SDK sends it, or a JSON object with the images by URL."""
    media_type = _media_type(request)
    if media_type == _JSON:
        body = await _uncached_body(request)
        if body.count(b"{") + body.count(b"[") > MAX_EDIT_JSON_STRUCTURES:
            raise OpenAIError(400, _TOO_MANY_STRUCTURES, code=INVALID_JSON)
        # Off the event loop: up to tens of MB of JSON, whose data URLs take a while.
        edit = await asyncio.to_thread(_json_body, ImageEditJsonRequest, body)
        del body  # not held while the edit runs: its images are in ``edit``
        yield edit
        return
    if media_type not in _FORMS:
        raise OpenAIError(
            400,
            "Image edits take a multipart/form-data body with the images as files, or a JSON "
            "body ('application/json') with the images' URLs in 'images'",
            code=NOT_MULTIPART,
        )
    try:
        form = await request.form()
    except StarletteHTTPException as unreadable:  # Starlette's 400 for a malformed form
        raise OpenAIError(
            400, f"The {media_type} body cannot be read: {unreadable.detail}", code=NOT_MULTIPART
        ) from None
    try:
        yield _form_body(ImageEditRequest, form, ImageEditRequest.LIST_FIELDS)
    finally:
        await form.close()


@_image_route(_EDITS, _EDIT_BODIES)
async def create_image_edit(
    edit: Annotated[ImageEditRequest | ImageEditJsonRequest, Depends(edit_request)],
    request: Request,
    service: Service,
) -> Response:
    """Edit images following a prompt (OpenAI ``images.edit``): a multipart form, or a JSON
    object whose images are given by URL."""
    request_id = request_id_of(request)
    answer = await service.edit(edit, request_id, request_deadline(request))
    return await _answer(answer, request_id)


@v1.get("/models", tags=["models"])
async def list_models(service: Service) -> ModelList:
    """The enabled models."""
    return service.models()


@v1.get("/models/{model_id:path}", tags=["models"])
async def retrieve_model(model_id: str, service: Service) -> ModelCard:
    """One model."""
    return service.model(model_id)


health = APIRouter(prefix="/health", tags=["health"])


@health.get("/live")
async def live() -> dict[str, str]:
    """The process answers."""
    return {"status": "alive"}


@health.get("/ready", responses={503: {"model": ErrorResponse, "description": "Not ready"}})
async def ready(service: Service) -> dict[str, Any]:
    """Every enabled model's predictor reports its model ready."""
    not_ready = await service.not_ready()
    if not_ready:
        reasons = ", ".join(f"{model}: {why}" for model, why in not_ready.items())
        raise OpenAIError(503, f"Not ready ({reasons})", code=NOT_READY)
    return {"status": "ready", "models": service.model_ids}


metrics = APIRouter(include_in_schema=False)


@metrics.get("/metrics")
async def prometheus_metrics() -> Response:
    """Prometheus metrics (``openai_adapter.metrics``), in the text exposition format."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
