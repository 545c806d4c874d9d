"""Errors in OpenAI's shape, and the handlers that give every failure that shape."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from openai_adapter import metrics
from openai_adapter.middleware import REQUEST_ID_HEADER, error_json, request_id_of
from openai_adapter.protocol import ErrorInfo, StreamErrorEvent
from predictors.asgi import UnexpectedErrorAnswer

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

# The codes of this adapter's errors; OpenAI's own where one exists.
INVALID_VALUE = "invalid_value"
MISSING_PARAMETER = "missing_required_parameter"
UNKNOWN_PARAMETER = "unknown_parameter"
UNSUPPORTED_VALUE = "unsupported_value"
INVALID_JSON = "invalid_json"
NOT_MULTIPART = "invalid_content_type"
INVALID_IMAGE_FORMAT = "invalid_image_format"
IMAGE_TOO_LARGE = "image_too_large"
INVALID_API_KEY = "invalid_api_key"
MODEL_NOT_FOUND = "model_not_found"
PREDICTOR_UNAVAILABLE = "predictor_unavailable"
PREDICTOR_BUSY = "predictor_busy"
PREDICTOR_TIMEOUT = "predictor_timeout"
PREDICTOR_ERROR = "predictor_error"
INFERENCE_ERROR = "inference_error"
INTERNAL_ERROR = "internal_error"
NOT_READY = "not_ready"

# The openai SDK retries 5xx answers unless told not to (its own header).
NO_RETRY = {"x-should-retry": "false"}
# What a body that is JSON but not an object, or not sent as JSON, is told.
NOT_A_JSON_OBJECT = "The request body must be a JSON object, sent as 'application/json'"

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
# The OpenAI image endpoints this server does not offer, with what to use instead.
_NOT_OFFERED = {
    "/v1/images/variations": "image variations (dall-e-2's) are not offered here; to change "
    "an image, edit it with a prompt (/v1/images/edits)",
}
_INTERNAL_ERROR = ErrorInfo(message="Internal server error", type=SERVER_ERROR, code=INTERNAL_ERROR)
_VALIDATION_CODES = {
    "missing": MISSING_PARAMETER,
    "extra_forbidden": UNKNOWN_PARAMETER,
    "json_invalid": INVALID_JSON,
}


class OpenAIError(Exception):
    """A failure to answer with ``status`` and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(
            message=message,
            type=INVALID_REQUEST if status < 500 else SERVER_ERROR,
            param=param,
            code=code,
        )
        self.headers = dict(headers or {})


def unusable_answer(message: str) -> OpenAIError:
    """A 502 for a predictor's answer that cannot be used (a malformed body, no usable
    image), which the client is told not to retry: the predictor has done the GPU work, and
    would most likely answer the same again."""
    return OpenAIError(502, message, code=PREDICTOR_ERROR, headers=NO_RETRY)


def bad_request(message: str, param: str | None, code: str = INVALID_VALUE) -> OpenAIError:
    """A 400 about ``param``."""
    return OpenAIError(400, message, param=param, code=code)


def model_not_found(model: str, detail: str = "") -> OpenAIError:
    """A 404 for a model id that no enabled predictor serves; ``detail`` ends the message."""
    return OpenAIError(
        404, f"The model '{model}' does not exist{detail}", param="model", code=MODEL_NOT_FOUND
    )


def error_response(
    request: Request, status: int, info: ErrorInfo, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The JSON answer for an error; it carries the request id even outside the middleware."""
    return error_json(status, info, {REQUEST_ID_HEADER: request_id_of(request), **(headers or {})})


def _validation_info(exc: RequestValidationError) -> ErrorInfo:
    """The first validation problem as an OpenAI error, pointing at its field."""
    error = exc.errors()[0]
    loc = tuple(error.get("loc", ()))
    if loc[:1] == ("body",):  # where FastAPI's errors start; a field may be named so too
        loc = loc[1:]
    param = next((part for part in loc if isinstance(part, str)), None)  # a request field
    path = _path(loc)  # within it, for the message: images[0].url
    code = _VALIDATION_CODES.get(error.get("type", ""), INVALID_VALUE)
    reason = str(error.get("msg", "")).removeprefix("Value error, ")
    if param is None:  # the body as a whole: missing, not JSON, or not a JSON object
        parse_error = error.get("ctx", {}).get("error", reason)
        message = {
            MISSING_PARAMETER: "Missing request body: send a JSON object",
            INVALID_JSON: f"The request body is not valid JSON (UTF-8): {parse_error}",
        }.get(code, NOT_A_JSON_OBJECT)
        return ErrorInfo(message=message, type=INVALID_REQUEST, code=INVALID_JSON)
    if code == UNKNOWN_PARAMETER:
        message = f"Unrecognized request argument supplied: {path}"
    elif code == MISSING_PARAMETER:
        message = f"Missing required parameter: '{path}'"
    else:
        message = f"Invalid value for '{path}': {reason}"
    return ErrorInfo(message=message, type=INVALID_REQUEST, param=param, code=code)


def _path(loc: Sequence[str | int]) -> str:
    """A validation error's place in the request: ``size``, ``images[0].image_url``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


def install_error_handlers(app: FastAPI) -> None:
    """Answer the routes' errors, FastAPI's own included, with an OpenAI error body
    (unexpected exceptions: ``UnexpectedErrorMiddleware``, and the last resort here)."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(request, exc.status, exc.info, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 400, _validation_info(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code in _HTTP_CODES:
            message = f"{message}: {request.method} {request.url.path}"
        if exc.status_code == 404 and request.url.path in _NOT_OFFERED:
            message = f"{message}: {_NOT_OFFERED[request.url.path]}"
        info = ErrorInfo(
            message=message,
            type=INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR,
            code=_HTTP_CODES.get(exc.status_code),
        )
        return error_response(request, exc.status_code, info, exc.headers)

    @app.exception_handler(Exception)
    async def _last_resort(request: Request, exc: Exception) -> JSONResponse:
        # A fault in a middleware outside UnexpectedErrorMiddleware: Starlette answers it
        # outside every middleware, then raises it on to the server, which logs it.
        return error_response(request, 500, _INTERNAL_ERROR)


def stream_error(exc: Exception, request_id: str) -> StreamErrorEvent:
    """The ``error`` event that ends a stream failing after its first event: an
    ``OpenAIError``'s body, or for anything else an internal error's. Its status (200) is
    sent already, so the failure is logged and counted here (``STREAM_ERRORS``)."""
    if isinstance(exc, OpenAIError):
        info = exc.info
        logger.warning(
            "request_id=%s stream ended by an error: %s %s", request_id, info.code, info.message
        )
    else:
        info = _INTERNAL_ERROR
        logger.error("request_id=%s unexpected error in a stream", request_id, exc_info=exc)
    metrics.STREAM_ERRORS.labels(code=info.code).inc()
    return StreamErrorEvent(error=info)


class UnexpectedErrorMiddleware(UnexpectedErrorAnswer):
    """Answer an unexpected exception with a 500 in OpenAI's shape, and log it once. Placed
    inside the CORS middleware, so that the answer has its headers (without them a browser
    would see a network error instead of the 500)."""

    async def answer(self, request: Request, exc: Exception) -> JSONResponse:
        logger.error("request_id=%s unexpected error", request_id_of(request), exc_info=exc)
        return error_response(request, 500, _INTERNAL_ERROR)
