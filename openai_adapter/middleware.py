"""Request ids, access logs and metrics for every request; each request's deadline; and caps
on request bodies: each body's size and pace, and the upload bytes held at once."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import re
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openai_adapter import metrics
from openai_adapter.protocol import ErrorInfo, ErrorResponse
from predictors.asgi import HttpMiddleware

logger = logging.getLogger("openai_adapter.access")

REQUEST_ID_HEADER = "x-request-id"
# The code of the 503 that ``UploadBudgetMiddleware`` answers.
SERVER_BUSY = "server_busy"
# The access log's status of a request whose client left before its answer (nginx's 499).
CLIENT_CLOSED_REQUEST = 499
_HEADER = REQUEST_ID_HEADER.encode()
_STATE_KEY = "request_id"
_DEADLINE_KEY = "deadline"
# A client's id is kept when it is short printable ASCII, so that it is safe to log and forward.
_VALID_ID = re.compile(r"[\x21-\x7e]{1,128}")


def loggable_path(scope: Scope) -> str:
    """The request's path as the client sent it, percent-escapes kept, with any other
    control or non-ASCII byte (and backslash) escaped: it cannot forge or break log lines."""
    raw = scope.get("raw_path") or scope["path"].encode()
    return raw.decode("latin-1").encode("unicode_escape").decode("ascii")


def request_id_of(request: Request) -> str:
    """The id that ``AccessMiddleware`` gave this request."""
    return request.scope.get("state", {}).get(_STATE_KEY, "")


def request_deadline(request: Request) -> float:
    """When ``RequestLimitsMiddleware`` has this request end (event loop time); infinity
    outside it."""
    return request.scope.get("state", {}).get(_DEADLINE_KEY, math.inf)


def error_json(
    status: int, info: ErrorInfo, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An answer with OpenAI's error body."""
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status, headers=headers)


class AccessMiddleware(HttpMiddleware):
    """Give each request an id (the client's ``x-request-id`` or a new one), echo it in the
    response, log one access line with it and count it in ``openai_adapter.metrics``
    (status 499 when the client left first, also in the middle of a streamed answer)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = Request(scope).headers.get(REQUEST_ID_HEADER, "")
        request_id = sent if _VALID_ID.fullmatch(sent) else uuid.uuid4().hex
        scope.setdefault("state", {})[_STATE_KEY] = request_id
        counted = metrics.in_progress_counted(scope)
        if counted:
            metrics.IN_PROGRESS.inc()
        start = time.perf_counter()
        status = 500
        answer_started = answer_ended = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, answer_started, answer_ended
            if message["type"] == "http.response.start":
                status, answer_started = message["status"], True
                headers = [(k, v) for k, v in message.get("headers", []) if k != _HEADER]
                headers.append((_HEADER, request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                answer_ended = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
            if answer_started and not answer_ended:  # a stream its client left (Starlette's)
                status = CLIENT_CLOSED_REQUEST
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_REQUEST
            raise
        finally:
            seconds = time.perf_counter() - start
            if counted:
                metrics.IN_PROGRESS.dec()
            metrics.record(scope, status, seconds)
            logger.info(
                "request_id=%s %s %s %d %.1fms",
                request_id,
                scope["method"],
                loggable_path(scope),
                status,
                seconds * 1000,
            )


class RequestTooLarge(Exception):
    """A request body grew past the limit while it was being received."""


class BodyStalled(Exception):
    """A request body stopped arriving before its end."""


class RequestLimitsMiddleware(HttpMiddleware):
    """Give each request its deadline, ``timeout_seconds`` after its arrival
    (``request_deadline``), by which its body too must have arrived (else a 408), and refuse
    bodies over ``max_bytes``, or over ``path_limits[path]`` for the paths listed there, with
    413 before they are received: at once when ``Content-Length`` says so, else (chunked
    uploads) as soon as the bytes pass the limit. A body of which nothing arrives for
    ``idle_timeout_seconds`` before its end gets a 408, and so does one that has not arrived
    ``idle_timeout_seconds`` after its start plus one second per ``min_rate_bytes_per_second``
    bytes received (0: no such deadline), as Apache's mod_reqtimeout sets one: either would
    otherwise hold its place, and its share of the upload budget, for as long as its client
    likes."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        path_limits: Mapping[str, int],
        idle_timeout_seconds: float,
        min_rate_bytes_per_second: float = 0,
        routes: Collection[str] = (),
        timeout_seconds: float = math.inf,
    ):
        super().__init__(app)
        self.timeout_seconds = timeout_seconds
        self.max_bytes = max_bytes
        self.path_limits = dict(path_limits)
        self.routes = frozenset(routes)
        self.idle_timeout_seconds = idle_timeout_seconds
        self.min_rate_bytes_per_second = min_rate_bytes_per_second

    @staticmethod
    def refusal(status: int, code: str, message: str) -> JSONResponse:
        """The answer to a body refused before its end; its connection is closed, as the
        rest of the body is not read."""
        info = ErrorInfo(message=message, type="invalid_request_error", param=None, code=code)
        return error_json(status, info, {"connection": "close"})

    def too_large(self, max_bytes: int) -> JSONResponse:
        message = f"The request body is larger than {max_bytes} bytes"
        return self.refusal(413, "request_too_large", message)

    def stalled(self) -> JSONResponse:
        message = f"Nothing of the request body arrived for {self.idle_timeout_seconds:g} s"
        return self.refusal(408, "request_timeout", message)

    def too_slow(self) -> JSONResponse:
        message = (
            f"The request body arrived slower than {self.min_rate_bytes_per_second:g} bytes "
            "a second"
        )
        return self.refusal(408, "request_timeout", message)

    def out_of_time(self) -> JSONResponse:
        message = f"The request body did not arrive within the request's {self.timeout_seconds:g} s"
        return self.refusal(408, "request_timeout", message)

    def body_deadline(self, started: float, received: int) -> float:
        """When a body first read at ``started`` (loop time) with ``received`` bytes so far
        must have arrived (infinity without a minimum rate)."""
        if not self.min_rate_bytes_per_second:
            return math.inf
        return started + self.idle_timeout_seconds + received / self.min_rate_bytes_per_second

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_seconds
        scope.setdefault("state", {})[_DEADLINE_KEY] = deadline
        max_bytes = self.path_limits.get(scope["path"], self.max_bytes)
        length = Request(scope).headers.get("content-length", "")
        if length.isdigit() and int(length) > max_bytes:
            if scope["path"] in self.routes:  # counted under its route, not ``unrouted``
                scope[metrics.ANSWERED_ROUTE] = scope["path"]
            await self.too_large(max_bytes)(scope, receive, send)
            return
        received = 0
        body_complete = False
        refusal: JSONResponse | None = None
        started = last_arrival = None  # loop times: the first read's, the last message's

        async def counting_receive() -> Message:
            nonlocal received, body_complete, refusal, started, last_arrival
            if body_complete:  # then only the disconnect is left to wait for, unbounded
                return await receive()
            now = loop.time()
            if started is None:
                started = last_arrival = now
            # A message already there is read even past the deadline (a moment to take it).
            body_deadline = min(self.body_deadline(started, received), deadline)
            left = max(body_deadline - now, 0.01)
            try:
                message = await asyncio.wait_for(receive(), min(self.idle_timeout_seconds, left))
            except TimeoutError:
                now = loop.time()
                if now - last_arrival >= self.idle_timeout_seconds - 0.01:
                    refusal = self.stalled()
                elif now >= deadline - 0.01:
                    refusal = self.out_of_time()
                else:
                    refusal = self.too_slow()
                raise BodyStalled from None
            last_arrival = loop.time()
            received += len(message.get("body", b""))
            body_complete = not message.get("more_body", False)
            if received > max_bytes:
                refusal = self.too_large(max_bytes)
                raise RequestTooLarge
            return message

        async def send_unless_refused(message: Message) -> None:
            if refusal is None:  # the app's own answer to a broken-off body is replaced
                await send(message)

        # Unless the app turned them into an answer.
        with contextlib.suppress(RequestTooLarge, BodyStalled):
            await self.app(scope, counting_receive, send_unless_refused)
        if refusal is not None:
            await refusal(scope, receive, send)


class UploadBudgetExceeded(Exception):
    """More bytes for a request than ``UploadBudgetMiddleware``'s budget has room for."""


@dataclass
class _Held:
    """What one request holds of an ``UploadBudgetMiddleware``'s budget."""

    budget: UploadBudgetMiddleware
    bytes: int = 0


# The hold of the request being served, where ``UploadBudgetMiddleware`` serves it.
_HELD: contextvars.ContextVar[_Held | None] = contextvars.ContextVar("upload_held", default=None)


def hold_upload_bytes(count: int) -> None:
    """Count ``count`` more bytes that the request being served holds beside its body (an
    image fetched from its URL) against ``UploadBudgetMiddleware``'s budget, until the
    request ends; ``UploadBudgetExceeded`` if they would pass it while other requests hold
    some. Nothing for a request outside the middleware's paths."""
    held = _HELD.get()
    if held is not None and not held.budget.take(held, count):
        raise UploadBudgetExceeded


class UploadBudgetMiddleware(HttpMiddleware):
    """Hold at most ``budget_bytes`` of request bodies to ``paths`` at once (their
    ``Content-Length``, or ``unknown_length_bytes`` for a body sent without one, and the
    images a request fetches: ``hold_upload_bytes``): a request that would pass it, while
    others hold some, gets a retryable 503 (before its body is read, or while it fetches:
    ``UploadBudgetExceeded``). A burst of large
    uploads then cannot exhaust the process's memory, and with it every request it holds.
    A request alone always fits, whatever its size."""

    def __init__(
        self,
        app: ASGIApp,
        paths: Sequence[str],
        budget_bytes: int,
        unknown_length_bytes: int,
        retry_after_seconds: int,
    ):
        super().__init__(app)
        self.paths = frozenset(paths)
        self.budget_bytes = budget_bytes
        self.unknown_length_bytes = unknown_length_bytes
        self.retry_after = str(retry_after_seconds)
        self.held_bytes = 0  # on the event loop only

    def busy(self) -> JSONResponse:
        info = ErrorInfo(
            message="The server is busy receiving other uploads; try again later",
            type="server_error",
            param=None,
            code=SERVER_BUSY,
        )
        return error_json(503, info, {"retry-after": self.retry_after})

    def take(self, held: _Held, count: int) -> bool:
        """Add ``count`` bytes to ``held`` unless that passes the budget while other
        requests hold some."""
        others = self.held_bytes - held.bytes
        if others and self.held_bytes + count > self.budget_bytes:
            return False
        self.held_bytes += count
        held.bytes += count
        return True

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        length = Request(scope).headers.get("content-length", "")
        held = _Held(self)
        if not self.take(held, int(length) if length.isdigit() else self.unknown_length_bytes):
            scope[metrics.ANSWERED_ROUTE] = scope["path"]  # one of ``paths``: a route's
            await self.busy()(scope, receive, send)
            return
        token = _HELD.set(held)
        try:
            await self.app(scope, receive, send)
        except UploadBudgetExceeded:  # from ``hold_upload_bytes``, before any answer
            await self.busy()(scope, receive, send)
        finally:
            _HELD.reset(token)
            self.held_bytes -= held.bytes
