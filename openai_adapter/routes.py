"""HTTP routes: parse the request, hand it to the image service, return its answer."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from openai_adapter.errors import INVALID_API_KEY, NOT_MULTIPART, NOT_READY, OpenAIError
from openai_adapter.middleware import request_id_of
from openai_adapter.protocol import (
    ErrorResponse,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
)
from openai_adapter.serving import ImageService, completed_events

_bearer = HTTPBearer(auto_error=False, description="The adapter's API key, when one is set.")
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request",
        401: "Missing or wrong API key",
        404: "Unknown model",
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
    """Refuse the request with a 401 unless it carries the configured API key."""
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    if credentials is None:
        raise OpenAIError(
            401, "No API key in an 'Authorization: Bearer <key>' header", code=INVALID_API_KEY
        )
    if not secrets.compare_digest(
        credentials.credentials.encode(), expected.get_secret_value().encode()
    ):
        raise OpenAIError(401, "Incorrect API key provided", code=INVALID_API_KEY)


def get_service(request: Request) -> ImageService:
    """The application's image service."""
    return request.app.state.service


Service = Annotated[ImageService, Depends(get_service)]


def _answer(response: ImagesResponse, request: ImageRequest, event_type: str) -> Response:
    """The images as one JSON body (serialized in one pass: it is large, base64-laden), or,
    for ``stream: true``, as server-sent ``event_type`` events, one per image."""
    if not request.stream:
        return Response(response.model_dump_json(), media_type="application/json")
    events = "".join(
        f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"
        for event in completed_events(response, request, event_type)
    )
    return Response(events, media_type="text/event-stream")


v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=_ERRORS)


@v1.post("/images/generations", response_model=ImagesResponse, tags=["images"])
async def create_image(
    body: ImageGenerationRequest, request: Request, service: Service
) -> Response:
    """Create images from a prompt (OpenAI ``images.generate``)."""
    response = await service.generate(body, request_id_of(request))
    return _answer(response, body, "image_generation.completed")


_FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")


def require_form(request: Request) -> None:
    """Edits carry their image as a file: a multipart form, as the openai SDK sends them (a
    JSON body would otherwise read as an empty form, missing its prompt)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in _FORMS:
        raise OpenAIError(
            400,
            "Image edits take a multipart/form-data body with the image as a file",
            code=NOT_MULTIPART,
        )


@v1.post(
    "/images/edits",
    response_model=ImagesResponse,
    tags=["images"],
    dependencies=[Depends(require_form)],
)
async def create_image_edit(
    form: Annotated[ImageEditRequest, Form(media_type="multipart/form-data")],
    request: Request,
    service: Service,
) -> Response:
    """Edit an image following a prompt (OpenAI ``images.edit``, multipart form)."""
    response = await service.edit(form, request_id_of(request))
    return _answer(response, form, "image_edit.completed")


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
