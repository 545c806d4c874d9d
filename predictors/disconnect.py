"""Cancel a request's handler when its client goes away (ASGI middleware, no torch).

Servers built on uvicorn and Starlette keep running a handler after its client has
disconnected: a generation nobody waits for would still hold its place in the predictor's
queue. With this middleware, a client that gives up (a timeout, a closed connection)
cancels the handler, and that cancellation travels on: the adapter's call to the predictor
is cancelled, which closes its connection, and the predictor's handler is cancelled in
turn, which takes a waiting request out of the queue. Both servers use it, and both stream
their server-sent events with ``EventStreamResponse``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from predictors.asgi import HttpMiddleware

EventT = TypeVar("EventT")
Chunk = TypeVar("Chunk", str, bytes)


class CancelOnDisconnect(HttpMiddleware):
    """Cancel the wrapped app when the client disconnects before any response has started,
    while its body is still arriving or after; a response already under way is left to
    finish."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        body_received = asyncio.Event()
        response_started = False
        client_left = False

        async def receive_request() -> Message:
            nonlocal client_left
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_received.set()
            elif message["type"] == "http.disconnect" and not response_started:
                # The client left while the app was reading its body: cancelled here, the
                # app never sees the disconnect (Starlette's ClientDisconnect, an error).
                client_left = True
                handler.cancel()
                await asyncio.Future()  # where the cancellation lands
            return message

        async def send_response(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        async def watch() -> None:
            # Once the request is read, the next message is a disconnect: the client's, or
            # the server's own once the response is complete.
            nonlocal client_left
            await body_received.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            if not response_started:
                client_left = True
                handler.cancel()

        handler = asyncio.ensure_future(self.app(scope, receive_request, send_response))
        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if not client_left:
                raise
        finally:
            watcher.cancel()
            # The closures' cells: a failed handler's error holds their frames in its
            # traceback, and the handler task the error, a cycle through the request.
            handler = watcher = None


async def server_sent_events(
    first: EventT,
    events: AsyncIterator[EventT],
    encode: Callable[[EventT], Chunk],
    error_event: Callable[[Exception], Chunk],
) -> AsyncIterator[Chunk]:
    """``first`` then ``events``, each encoded as a server-sent event; a failure after the
    first (whose 200 is sent already) as the stream's last event, ``error_event``'s. The
    events are closed at the end, or when the client leaves."""
    try:
        yield encode(first)
        async for event in events:
            yield encode(event)
    except Exception as exc:
        yield error_event(exc)
    finally:
        await events.aclose()


class EventStreamResponse(StreamingResponse):
    """Server-sent events (``text/event-stream``), not cached or buffered on the way
    (``x-accel-buffering: no`` for ingress-nginx), whose body iterator is closed when the
    response ends.

    A client that leaves while an event is being sent to it cancels that send, and Starlette
    then leaves the iterator suspended until the garbage collector finalizes it: what the
    iterator holds (the adapter's call to a predictor, a batch on the GPU) would go on for
    nobody. Closed here, its ``finally`` blocks run at once."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str | bytes]):
        super().__init__(content, headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if _asgi_spec_version(scope) >= (2, 4):  # a client's leaving fails ``send``
                await super().__call__(scope, receive, send)
            else:
                await self._send_until_disconnect(receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()

    async def _send_until_disconnect(self, receive: Receive, send: Send) -> None:
        """Starlette's way for servers of ASGI before 2.4 (uvicorn): the events are sent
        until they end or the client leaves, whichever comes first. In asyncio tasks, not
        Starlette's anyio task group, whose callback keeps a send cancelled by the client's
        leaving (its frames, the event being sent: megabytes of a preview) in a reference
        cycle until the garbage collector's pass."""
        sending = asyncio.ensure_future(self.stream_response(send))
        listening = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait((sending, listening), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sending.cancel()
            listening.cancel()
            await asyncio.wait((sending, listening))
        error = None if sending.cancelled() else sending.exception()
        if error is not None:
            try:
                raise error
            finally:  # the error's traceback holds this frame: no cycle through it
                error = sending = listening = None


def _asgi_spec_version(scope: Scope) -> tuple[int, ...]:
    return tuple(map(int, scope.get("asgi", {}).get("spec_version", "2.0").split(".")))
