"""Pure ASGI middleware building blocks that both servers use, the predictors and the
OpenAI adapter (no torch)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HttpMiddleware:
    """A pure ASGI middleware of HTTP requests: ``handle`` gets those, and any other scope
    (the lifespan) passes through to the app untouched."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request, calling ``self.app`` as the middleware sees fit."""
        raise NotImplementedError


class UnexpectedErrorAnswer(HttpMiddleware):
    """Answers an unexpected exception of the app with ``answer``'s response, here rather
    than in Starlette's outermost middleware. That one answers outside every other
    middleware (the answer misses their headers), then raises the exception again, for
    uvicorn to log it a second time and to close the connection. An exception raised once
    the response has started is raised on: its status is sent already."""

    async def answer(self, request: Request, exc: Exception) -> Response:
        """The response to ``exc``; logging it is the subclass's to do."""
        raise NotImplementedError

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def noting_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        except Exception as exc:
            if started:
                raise
            await (await self.answer(Request(scope), exc))(scope, receive, send)
