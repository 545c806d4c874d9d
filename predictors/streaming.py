"""``POST /v2/models/{model}/infer_stream``: a v2 infer call answered with server-sent events.

KServe's v2 REST protocol answers an infer call once, when the images are done. This route,
added to KServe's REST app, takes the same request and answers with the model's
``predict_stream``: a ``partial_image`` event per preview, then a ``completed`` event with
the v2 response (``predictors.contract`` describes both). A request refused before its run
starts gets the status and body ``/infer`` would give, from KServe's own error handlers; a
failure after the first event ends the stream with an ``error`` event.
"""

from __future__ import annotations

import logging

import orjson
import pydantic
import pydantic_core
from fastapi import FastAPI, Request
from kserve import InferRequest, InferResponse
from kserve.errors import InvalidInput, ModelNotReady, ServerNotReady
from kserve.protocol.rest.v2_datamodels import InferenceRequest

from predictors import contract
from predictors.disconnect import EventStreamResponse, server_sent_events
from predictors.model import QwenImageModel

logger = logging.getLogger(__name__)

STREAM_PATH = "/v2/models/{model}/infer_stream"

Event = tuple[str, InferResponse]


def add_stream_route(app: FastAPI, model: QwenImageModel) -> None:
    """Serve ``model``'s ``infer_stream`` on ``app`` (KServe's REST app)."""

    async def infer_stream(request: Request) -> EventStreamResponse:
        """A v2 infer request, answered as server-sent events (``predictors.streaming``)."""
        body = await request.body()
        try:
            payload = _infer_request(body, model.name)
        except InvalidInput as refused:
            model.refuse_body(_body_id(body), request.headers, str(refused))
            raise
        events = model.predict_stream(payload, dict(request.headers))
        # Awaited here, so that a refusal gets its own status rather than a stream's 200.
        first = await anext(events)
        return EventStreamResponse(server_sent_events(first, events, _encode, _error_event))

    app.add_api_route(
        STREAM_PATH.format(model=model.name),
        infer_stream,
        methods=["POST"],
        response_class=EventStreamResponse,
        summary="Infer, with previews as server-sent events",
    )


def _infer_request(body: bytes, model_name: str) -> InferRequest:
    """The v2 request of a JSON body. Its answers are JSON whatever it asks: an event is a
    line of text, which KServe's binary outputs are not."""
    try:
        request = InferenceRequest.model_validate_json(body)
    except pydantic.ValidationError as exc:
        raise InvalidInput(contract.describe_invalid_body(exc.errors())) from None
    if request.parameters:
        request.parameters.pop(contract.BINARY_DATA_OUTPUT, None)
    return InferRequest.from_inference_request(request, model_name)


def _body_id(body: bytes) -> object:
    """The ``id`` of a JSON body that the v2 request model refused, if it has one."""
    try:
        parsed = pydantic_core.from_json(body)
    except ValueError:
        return None
    return parsed.get("id") if isinstance(parsed, dict) else None


def _error_event(error: Exception) -> bytes:
    """The ``error`` event that ends a stream failing after its first event."""
    status = _status(error)
    if status == 500:
        logger.error("A streamed request failed after its first event", exc_info=error)
    return _event(contract.ERROR_EVENT, {"error": str(error), "status": status})


def _status(error: Exception) -> int:
    """The HTTP status KServe's handlers give ``error``."""
    if isinstance(error, InvalidInput):
        return 400
    if isinstance(error, ServerNotReady | ModelNotReady):
        return 503
    return 500


def _encode(event: Event) -> bytes:
    name, response = event
    body, _ = response.to_rest()
    return _event(name, body)


def _event(name: str, data: object) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
