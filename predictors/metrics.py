"""Prometheus metrics, exported on the KServe server's own ``/metrics``."""

from prometheus_client import Counter, Gauge, Histogram

LABELS = ["model_name"]

REQUEST_LATENCY = Histogram(
    "qwen_image_request_duration_seconds",
    "Time from accepting an infer request to its response, queueing included.",
    [*LABELS, "outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600),
)
QUEUE_DEPTH = Gauge(
    "qwen_image_queue_depth",
    "Requests accepted and not finished: those running (one batch) and those waiting.",
    LABELS,
)
IMAGES_GENERATED = Counter(
    "qwen_image_images_generated_total", "Images generated and returned.", LABELS
)
REQUESTS_REJECTED = Counter(
    "qwen_image_requests_rejected_total",
    "Requests refused before running: 'invalid' (400), 'busy' (queue full, 503) or "
    "'stopping' (shutting down, 503).",
    [*LABELS, "reason"],
)
BATCH_REQUESTS = Histogram(
    "qwen_image_batch_requests",
    "Requests run together in one pipeline call (1 unless cross-request batching is on).",
    LABELS,
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
)
