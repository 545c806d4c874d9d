"""KServe v2 REST calls to the predictors: inference over one pooled ``httpx.AsyncClient`` per
predictor, readiness checks over a small one of their own. They ignore the environment's
proxy settings (``trust_env=False``): ``HTTP(S)_PROXY`` is for image URL fetches, and the
predictors are reached directly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence

import httpx
import pydantic_core

from openai_adapter.errors import (
    INFERENCE_ERROR,
    NO_RETRY,
    PREDICTOR_BUSY,
    PREDICTOR_ERROR,
    PREDICTOR_TIMEOUT,
    PREDICTOR_UNAVAILABLE,
    OpenAIError,
    bad_request,
    unusable_answer,
)
from openai_adapter.middleware import REQUEST_ID_HEADER
from openai_adapter.settings import Settings
from predictors.contract import (
    BINARY_HEADER_LENGTH,
    COMPLETED_EVENT,
    ERROR_EVENT,
    PARTIAL_IMAGE_EVENT,
    ImageResult,
    PartialImage,
    error_param,
    parse_partial_image,
    parse_rest_binary_response,
    parse_rest_response,
)

logger = logging.getLogger(__name__)

# Connections of the readiness client: one check per model at a time is the usual load.
_READY_CONNECTIONS = 4
_SEND_CHUNK_BYTES = 1024 * 1024
# The client's fields whose value the adapter turns into another field's (``size`` into
# ``width`` and ``height``, ``quality`` into ``num_inference_steps``): a predictor's refusal
# of that value names both, as the client never sent the value it quotes.
_DERIVED_FIELDS = frozenset({"size", "quality"})


class PredictorClient:
    """Calls ``/v2/models/{model}/infer`` (or ``infer_stream``) and ``/ready`` on the
    predictor serving a model."""

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
        deadline: float,
    ) -> list[ImageResult]:
        """The images of one v2 infer call whose JSON body is ``body``'s parts joined
        (``contract.rest_body_parts``), answered by ``deadline`` (event loop time, the
        request's: ``middleware.request_deadline``); failures become ``OpenAIError``.

        ``param_names`` maps the contract's field names to the names the client used, so a
        predictor's 400 points at the client's own field.
        """
        start = time.perf_counter()
        with self._transport_errors(model):
            call = self._post(model, "infer", body, request_id)
            async with asyncio.timeout_at(deadline), call as response:
                content = await _read_body(response)
        _log_status(request_id, model, response, start)
        if response.status_code != 200:
            message = _error_message(response, content)
            raise self._status_error(model, response.status_code, message, param_names)
        with _invalid_answer(model):
            return _parse_results(response.headers, content)

    async def infer_stream(
        self,
        model: str,
        body: Sequence[bytes],
        request_id: str,
        param_names: Mapping[str, str],
        deadline: float,
    ) -> AsyncIterator[PartialImage | list[ImageResult]]:
        """``infer``'s call made to the predictor's ``infer_stream``: the previews of its
        images as they come, then its images, the last of them by ``deadline`` (the whole
        stream's, not each event's). Failures, before the first or after it, become
        ``OpenAIError`` as ``infer``'s do."""
        start = time.perf_counter()
        with self._transport_errors(model):
            async with contextlib.AsyncExitStack() as stack:
                call = self._post(model, "infer_stream", body, request_id)
                # Each wait is bounded on its own: a timeout cannot span the yields.
                async with asyncio.timeout_at(deadline):
                    response = await stack.enter_async_context(call)
                _log_status(request_id, model, response, start)
                if response.status_code != 200:
                    async with asyncio.timeout_at(deadline):
                        content = await _read_body(response)
                    message = _error_message(response, content)
                    raise self._status_error(model, response.status_code, message, param_names)
                events = await stack.enter_async_context(
                    contextlib.aclosing(_server_sent_events(response))
                )
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            event, data = await anext(events)
                    except StopAsyncIteration:
                        break
                    answer = self._stream_answer(model, event, data, param_names)
                    yield answer
                    if not isinstance(answer, PartialImage):
                        return
        # Retryable: a stream cut short is more likely a restart than a bad answer.
        raise OpenAIError(
            502, f"The '{model}' predictor ended its stream early", code=PREDICTOR_ERROR
        )

    def _post(
        self, model: str, endpoint: str, body: Sequence[bytes], request_id: str
    ) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
        """The streamed POST of a v2 call to ``model``'s ``endpoint`` (``infer`` or
        ``infer_stream``), its JSON body sent in chunks."""
        return self._inference[model].stream(
            "POST",
            f"{self._model_url(model)}/{endpoint}",
            content=_in_chunks(body),
            headers=_headers(body, request_id),
        )

    def _timed_out(self, model: str) -> OpenAIError:
        return OpenAIError(
            504,
            f"The request's {self._settings.request_timeout_seconds:g} seconds ran out before "
            f"the '{model}' predictor's answer was complete",
            code=PREDICTOR_TIMEOUT,
            headers=NO_RETRY,
        )

    def _stream_answer(
        self, model: str, event: str, data: bytes, param_names: Mapping[str, str]
    ) -> PartialImage | list[ImageResult]:
        """What an ``infer_stream`` event carries: a preview, or the images (``completed``);
        an ``error`` event, or one that cannot be read, raises its ``OpenAIError``."""
        with _invalid_answer(model):
            answer = pydantic_core.from_json(data)
            if event == PARTIAL_IMAGE_EVENT:
                return parse_partial_image(answer)
            if event == COMPLETED_EVENT:
                return parse_rest_response(answer)
            if event == ERROR_EVENT:
                status, message = int(answer["status"]), str(answer["error"])
                raise self._status_error(model, status, message, param_names)
            raise ValueError(f"unknown event '{event}'")

    @contextlib.contextmanager
    def _transport_errors(self, model: str) -> Iterator[None]:
        """A call to ``model``'s predictor whose transport failures, and the end of its
        request's time (``TimeoutError``, from ``asyncio.timeout_at``), become
        ``OpenAIError``."""
        try:
            yield
        except TimeoutError as exc:
            raise self._timed_out(model) from exc
        except httpx.PoolTimeout as exc:
            raise self._unavailable(model, "has no free connection") from exc
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                raise self._unavailable(model, "did not accept the connection") from exc
            raise self._timed_out(model) from exc
        except httpx.TransportError as exc:
            raise self._unavailable(model, f"is unreachable ({type(exc).__name__})") from exc

    def _unavailable(self, model: str, why: str) -> OpenAIError:
        return OpenAIError(
            503,
            f"The '{model}' predictor {why}; try again later",
            code=PREDICTOR_UNAVAILABLE,
            headers=self._retry_after,
        )

    def _status_error(
        self, model: str, status: int, message: str, param_names: Mapping[str, str]
    ) -> OpenAIError:
        """The OpenAI error for a predictor's error answer (status and message)."""
        if status == 400:
            field = error_param(message)
            param = param_names.get(field, field) if field else None
            if field and param != field:
                named = f"'{param}' (as '{field}')" if param in _DERIVED_FIELDS else f"'{param}'"
                message = named + message[len(field) + 2 :]
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
                headers=NO_RETRY,
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


def _headers(body: Sequence[bytes], request_id: str) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "content-length": str(sum(len(part) for part in body)),
        REQUEST_ID_HEADER: request_id,
    }


def _log_status(request_id: str, model: str, response: httpx.Response, start: float) -> None:
    logger.info(
        "request_id=%s predictor=%s status=%d %.1fms",
        request_id,
        model,
        response.status_code,
        (time.perf_counter() - start) * 1000,
    )


@contextlib.contextmanager
def _invalid_answer(model: str) -> Iterator[None]:
    """Reading an answer of ``model``'s predictor, whose flaws become a 502."""
    try:
        yield
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise unusable_answer(f"The '{model}' predictor sent an invalid answer: {exc}") from exc


async def _server_sent_events(response: httpx.Response) -> AsyncIterator[tuple[str, bytes]]:
    """The (event, data) pairs of a server-sent event stream (one data line each, as the
    predictors send them). The data stays bytes, read as JSON (UTF-8) where a flaw in it is
    the predictor's invalid answer."""
    event, data = "message", b""
    async with contextlib.aclosing(_lines(response)) as lines:
        async for line in lines:
            if not line:
                if data:
                    yield event, data
                event, data = "message", b""
            elif line.startswith(b"event:"):
                event = line[6:].strip().decode(errors="replace")
            elif line.startswith(b"data:"):
                data = line[5:].lstrip()


async def _lines(response: httpx.Response) -> AsyncIterator[bytes]:
    """The lines of a server-sent event stream as the predictors end them, with LF (or
    CRLF): httpx's ``aiter_lines`` also breaks lines at Unicode line separators, which JSON
    text may hold unescaped. A line of megabytes (an image's base64) is joined once."""
    pending: list[bytes] = []
    async for chunk in response.aiter_bytes():
        *ended, rest = chunk.split(b"\n")
        for part in ended:
            pending.append(part)
            yield b"".join(pending).removesuffix(b"\r")
            pending = []
        pending.append(rest)
    if any(pending):
        yield b"".join(pending).removesuffix(b"\r")


async def _read_body(response: httpx.Response) -> bytearray:
    """A streamed response's body, read here rather than with ``aread``: httpx's response
    and its stream refer to each other, so a body that ``aread`` keeps on the response (ten
    images: hundreds of MB) would outlive the request until the garbage collector's next
    full pass."""
    content = bytearray()
    async for chunk in response.aiter_bytes():
        content += chunk
    return content


def _parse_results(headers: httpx.Headers, content: bytearray) -> list[ImageResult]:
    """The images of a successful answer, with binary outputs or all in JSON."""
    header_length = headers.get(BINARY_HEADER_LENGTH)
    if header_length is not None:
        return parse_rest_binary_response(content, int(header_length))
    return parse_rest_response(pydantic_core.from_json(content))


def _error_message(response: httpx.Response, content: bytearray) -> str:
    """KServe's ``{"error": "..."}`` text in an error answer's body (``content``), or the
    start of whatever else came back."""
    try:
        error = pydantic_core.from_json(content).get("error")
    except (ValueError, AttributeError):
        error = None
    text = content[:500].decode(response.encoding or "utf-8", errors="replace")
    return str(error) if error else text or response.reason_phrase
