"""Prometheus metrics of the adapter, served at ``/metrics`` (the predictors export their
own, from the GPU side)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import Scope

LABELS = ["route", "method"]
# Methods are counted by name only when standard: a client's made-up ones would grow the
# label set.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The route of requests answered without reaching one: unknown paths (so that they cannot
# grow the label set), bodies to other paths than the images' refused by their
# Content-Length (413), and CORS preflights.
UNROUTED = "unrouted"
API_PREFIX = "/v1/"
# The scope key where a middleware that answers a route's requests before routing (the
# upload budget's 503, the size check's 413) names that route's path, so that its answers
# count under the route.
ANSWERED_ROUTE = "qwen_image_answered_route"

REQUESTS = Counter(
    "qwen_image_adapter_requests_total",
    "Requests answered, by route template, method and HTTP status (499: the client left).",
    [*LABELS, "status"],
)
REQUEST_LATENCY = Histogram(
    "qwen_image_adapter_request_duration_seconds",
    "Time from receiving a request to the end of its answer, predictor time included.",
    LABELS,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
)
IN_PROGRESS = Gauge(
    "qwen_image_adapter_requests_in_progress",
    "API requests (/v1) not answered yet; not probes or scrapes.",
)
STREAM_ERRORS = Counter(
    "qwen_image_adapter_stream_errors_total",
    "Streams (stream: true) ended by an error event after their first event, whose status "
    "(200) was sent already, by OpenAI error code.",
    ["code"],
)
IMAGE_URLS = Counter(
    "qwen_image_adapter_image_urls_total",
    "Edit images given by a URL other than a data URL, by outcome: fetched, refused (scheme or "
    "host not allowed), failed (invalid, unreachable, not a 200, encoded), timed_out.",
    ["outcome"],
)
IMAGE_URL_FETCH_SECONDS = Histogram(
    "qwen_image_adapter_image_url_fetch_duration_seconds",
    "Time to fetch an image URL, of those fetched.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def in_progress_counted(scope: Scope) -> bool:
    """Whether ``IN_PROGRESS`` counts ``scope``'s request: the API's (/v1) are, health
    checks, scrapes and docs are not (a scrape would count itself, so the gauge would never
    read 0)."""
    return scope["path"].startswith(API_PREFIX)


def record(scope: Scope, status: int, seconds: float) -> None:
    """Count an answered request under the template of the route it reached (such as
    ``/v1/models/{model_id:path}``) or was answered for (``ANSWERED_ROUTE``), or
    ``unrouted``."""
    route = getattr(scope.get("route"), "path", None) or scope.get(ANSWERED_ROUTE, UNROUTED)
    method = scope["method"] if scope["method"] in METHODS else "other"
    labels = {"route": route, "method": method}
    REQUESTS.labels(**labels, status=str(status)).inc()
    REQUEST_LATENCY.labels(**labels).observe(seconds)
