"""KServe v2 REST calls to the predictors: inference over one pooled ``httpx.AsyncClient`` per
predictor, readiness checks over a small one of their own. They ignore the environment's
proxy settings (``trust_env=False``): ``HTTP(S)_PROXY`` is for image URL fetches, and the
predictors are reached directly."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import httpx
import pydantic_core

from openai_adapter.errors import (
    INFERENCE_ERROR,
    PREDICTOR_BUSY,
    PREDICTOR_ERROR,
    PREDICTOR_TIMEOUT,
    PREDICTOR_UNAVAILABLE,
    OpenAIError,
    bad_request,
)
from openai_adapter.middleware import REQUEST_ID_HEADER
from openai_adapter.settings import Settings
from predictors.contract import (
    BINARY_HEADER_LENGTH,
    ImageResult,
    error_param,
    parse_rest_binary_response,
    parse_rest_response,
)

logger = logging.getLogger(__name__)

_NO_RETRY = {"x-should-retry": "false"}
# Connections of the readiness client: one check per model at a time is the usual load.
_READY_CONNECTIONS = 4
_SEND_CHUNK_BYTES = 1024 * 1024


class PredictorClient:
    """Calls ``/v2/models/{model}/infer`` and ``/ready`` on the predictor serving a model."""

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None):
        self._settings = settings
        self._retry_after = {"retry-after": str(settings.retry_after_seconds)}
        # One pool per predictor, so that one saturated predictor cannot take the
        # connections another one needs.
        self._inference = {
            model: _inference_client(settings, transport) for model in settings.models
        }
        # Readiness checks get their own pool, so that generations holding every inference
        # connection do not make a ready predictor look unreachable.
        self._ready_http = httpx.AsyncClient(
            transport=transport,
            trust_env=False,
            timeout=settings.ready_timeout_seconds,
            limits=httpx.Limits(max_connections=_READY_CONNECTIONS),
        )

    async def aclose(self) -> None:
        """Close the pooled connections."""
        for client in self._inference.values():
            await client.aclose()
        await self._ready_http.aclose()

    def _model_url(self, model: str) -> str:
        return f"{self._settings.predictor_url(model)}/v2/models/{model}"

    async def infer(
        self,
        model: str,
        body: Sequence[bytes],
        request_id: str,
        param_names: Mapping[str, str],
    ) -> list[ImageResult]:
        """The images of one v2 infer call whose JSON body is ``body``'s parts joined
        (``contract.rest_body_parts``); failures become ``OpenAIError``.

        ``param_names`` maps the contract's field names to the names the client used, so a
        predictor's 400 points at the client's own field.
        """
        start = time.perf_counter()
        headers = {
            "content-type": "application/json",
            "content-length": str(sum(len(part) for part in body)),
            REQUEST_ID_HEADER: request_id,
        }
        try:
            response = await self._inference[model].post(
                f"{self._model_url(model)}/infer", content=_in_chunks(body), headers=headers
            )
        except httpx.PoolTimeout as exc:
            raise self._unavailable(model, "has no free connection") from exc
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                raise self._unavailable(model, "did not accept the connection") from exc
            raise OpenAIError(
                504,
                f"The '{model}' predictor did not answer within "
                f"{self._settings.request_timeout_seconds:g} seconds",
                code=PREDICTOR_TIMEOUT,
                headers=_NO_RETRY,
            ) from exc
        except httpx.TransportError as exc:
            raise self._unavailable(model, f"is unreachable ({type(exc).__name__})") from exc
        logger.info(
            "request_id=%s predictor=%s status=%d %.1fms",
            request_id,
            model,
            response.status_code,
            (time.perf_counter() - start) * 1000,
        )
        if response.status_code == 200:
            try:
                return _parse_results(response)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                message = f"The '{model}' predictor sent an invalid answer: {exc}"
                raise OpenAIError(502, message, code=PREDICTOR_ERROR) from exc
        raise self._status_error(model, response, param_names)

    def _unavailable(self, model: str, why: str) -> OpenAIError:
        return OpenAIError(
            503,
            f"The '{model}' predictor {why}; try again later",
            code=PREDICTOR_UNAVAILABLE,
            headers=self._retry_after,
        )

    def _status_error(
        self, model: str, response: httpx.Response, param_names: Mapping[str, str]
    ) -> OpenAIError:
        """The OpenAI error for a predictor's error answer."""
        message = _error_message(response)
        status = response.status_code
        if status == 400:
            field = error_param(message)
            param = param_names.get(field, field) if field else None
            if field and param != field:
                message = f"'{param}'{message[len(field) + 2 :]}"
            return bad_request(message, param)
        if status == 503:
            return OpenAIError(
                503,
                f"The '{model}' predictor is busy or not ready ({message}); try again later",
                code=PREDICTOR_BUSY,
                headers=self._retry_after,
            )
        if status == 500:
            return OpenAIError(
                500,
                f"The '{model}' predictor failed: {message}",
                code=INFERENCE_ERROR,
                headers=_NO_RETRY,
            )
        return OpenAIError(
            502, f"The '{model}' predictor answered {status}: {message}", code=PREDICTOR_ERROR
        )

    async def not_ready(self, model: str) -> str | None:
        """Why ``model``'s predictor is not ready, or None when it is."""
        try:
            response = await self._ready_http.get(f"{self._model_url(model)}/ready")
        except httpx.HTTPError as exc:
            return f"unreachable ({type(exc).__name__})"
        return None if response.status_code == 200 else f"answered {response.status_code}"

    async def not_ready_models(self, models: list[str]) -> dict[str, str]:
        """The models whose predictors are not ready, with the reason, checked concurrently."""
        reasons = await asyncio.gather(*(self.not_ready(model) for model in models))
        return {model: reason for model, reason in zip(models, reasons, strict=True) if reason}


def _inference_client(
    settings: Settings, transport: httpx.AsyncBaseTransport | None
) -> httpx.AsyncClient:
    """The pooled client of one predictor's inference calls."""
    return httpx.AsyncClient(
        transport=transport,
        trust_env=False,
        # A request that finds every connection busy waits no longer for one than for a
        # connection to open: it is shed with a 503 and Retry-After, as a full predictor
        # queue sheds it, rather than queued here for minutes.
        timeout=httpx.Timeout(
            settings.request_timeout_seconds,
            connect=settings.connect_timeout_seconds,
            pool=settings.connect_timeout_seconds,
        ),
        limits=httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_connections,
        ),
    )


async def _in_chunks(parts: Sequence[bytes]) -> AsyncIterator[bytes]:
    """``parts`` in chunks of at most ``_SEND_CHUNK_BYTES``: the HTTP layer copies each chunk
    it sends, and a chunk that size keeps that copy small beside an upload's base64."""
    for part in parts:
        for start in range(0, len(part), _SEND_CHUNK_BYTES):
            yield part[start : start + _SEND_CHUNK_BYTES]


def _parse_results(response: httpx.Response) -> list[ImageResult]:
    """The images of a successful answer, with binary outputs or all in JSON."""
    header_length = response.headers.get(BINARY_HEADER_LENGTH)
    if header_length is not None:
        return parse_rest_binary_response(response.content, int(header_length))
    return parse_rest_response(pydantic_core.from_json(response.content))


def _error_message(response: httpx.Response) -> str:
    """KServe's ``{"error": "..."}`` text, or the start of whatever else came back."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    return str(error) if error else response.text[:500] or response.reason_phrase
