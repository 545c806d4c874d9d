"""The application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from openai_adapter.errors import UnexpectedErrorMiddleware, install_error_handlers
from openai_adapter.image_urls import ImageUrlReader
from openai_adapter.middleware import (
    REQUEST_ID_HEADER,
    AccessMiddleware,
    RequestLimitsMiddleware,
    UploadBudgetMiddleware,
)
from openai_adapter.predictor_client import PredictorClient
from openai_adapter.routes import EDITS_PATH, GENERATIONS_PATH, health, metrics, route_schemas, v1
from openai_adapter.serving import ImageService
from openai_adapter.settings import Settings
from predictors.disconnect import CancelOnDisconnect

# Room beside the largest upload for the other fields of an edit.
FORM_OVERHEAD_BYTES = 1024 * 1024
# The largest generation body: text fields only. Both prompts at their longest (32000
# characters each) fit even with every character a JSON-escaped surrogate pair (12 bytes,
# 768000 bytes in all), and a client cannot make the adapter hold the edits' megabytes.
GENERATION_MAX_BODY_BYTES = 1024 * 1024


def max_body_bytes(max_upload_bytes: int) -> int:
    """The largest request body: the largest upload as base64 (a JSON edit's data URLs), with
    room for the other fields."""
    return 4 * -(-max_upload_bytes // 3) + FORM_OVERHEAD_BYTES


def _version() -> str:
    try:
        return version("qwen-image-serve")
    except PackageNotFoundError:
        return "0.0.0"


def create_app(
    settings: Settings | None = None, transport: httpx.AsyncBaseTransport | None = None
) -> FastAPI:
    """The adapter app; ``transport`` replaces the network to the predictors in tests."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = PredictorClient(settings, transport)
        image_urls = ImageUrlReader(settings)
        app.state.service = ImageService(settings, client, image_urls)
        try:
            yield
        finally:
            await client.aclose()
            await image_urls.aclose()

    app = FastAPI(
        title="Qwen-Image OpenAI Images API",
        description="OpenAI-compatible image generation and editing, served by KServe "
        "predictors for Qwen-Image and Qwen-Image-Edit.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(v1)
    app.include_router(health)
    app.include_router(metrics)
    install_error_handlers(app)
    # Middleware added last runs first: a client's disconnect cancels everything inside,
    # the request id (with its access log line and metrics) wraps the rest, and CORS headers
    # reach every answer: the size checks' 413 and 503, and the 500 of an unexpected error.
    app.add_middleware(
        UploadBudgetMiddleware,
        paths=[EDITS_PATH],
        budget_bytes=settings.max_upload_bytes_in_flight,
        unknown_length_bytes=max_body_bytes(settings.max_upload_bytes),
        retry_after_seconds=settings.retry_after_seconds,
    )
    app.add_middleware(
        RequestLimitsMiddleware,
        max_bytes=max_body_bytes(settings.max_upload_bytes),
        path_limits={GENERATIONS_PATH: GENERATION_MAX_BODY_BYTES},
        routes=[GENERATIONS_PATH, EDITS_PATH],
        idle_timeout_seconds=settings.body_idle_timeout_seconds,
        min_rate_bytes_per_second=settings.body_min_rate_bytes_per_second,
        timeout_seconds=settings.request_timeout_seconds,
    )
    app.add_middleware(UnexpectedErrorMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=[REQUEST_ID_HEADER, "retry-after", "x-should-retry"],
        )
    app.add_middleware(AccessMiddleware)
    app.add_middleware(CancelOnDisconnect)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema without its 422 answers, which this app never gives, and with the
        bodies' schemas, which the routes read themselves."""
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            for path in schema["paths"].values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            components.update(route_schemas())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
