"""What the OpenAI adapter and its v2 hop add to a request, against calling the predictor.

Both paths ask the same generation predictor for the same image (same prompt, seed, size,
steps and format) and end when the client holds the image file's bytes:

- direct:  v2 ``POST /v2/models/qwen-image/infer`` with binary outputs, as the adapter sends it;
- adapter: ``POST /v1/images/generations`` (JSON, base64 image in the answer, decoded).

Requests alternate between the paths (the order flips every pair) after warm-up requests.
On a CPU the pipeline's own time varies by more than the adapter adds, so when the script
runs the predictor itself it also reads, per request, the time the predictor spent inside
the model (KServe's latency log: preprocess + predict + postprocess, which includes encoding
the image) and compares what remains outside it on each path. The output encoding
(PNG/JPEG/WebP) happens once, in the predictor, on both paths; its cost is measured on its
own line.

By default the script starts a generation predictor (tiny model unless QWEN_IMAGE_LOCATION
is set) and an adapter on free loopback ports; ``--predictor-url`` with ``--adapter-url``
measures running ones instead (totals only). Run:
``python bench/adapter_overhead.py [--requests 50]``.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from PIL import Image

from predictors.contract import (
    BINARY_HEADER_LENGTH,
    GENERATION_MODEL_NAME,
    build_rest_body,
    parse_rest_binary_response,
)
from predictors.images import encode_image
from tests.servers import free_port, run_predictor, wait_for_ok

PROMPT = "A cute cat sleeping on a sofa"


@dataclass
class Services:
    """The two endpoints, and their logs when this script runs them."""

    predictor_url: str
    adapter_url: str
    predictor_log: Path | None = None
    adapter_log: Path | None = None


@contextmanager
def local_services(log_dir: Path) -> Iterator[Services]:
    """A generation predictor and an adapter in front of it, on free loopback ports."""
    with run_predictor("predictors.generation", GENERATION_MODEL_NAME, log_dir) as predictor:
        adapter_port = free_port()
        services = Services(
            predictor_url=predictor.url,
            adapter_url=f"http://127.0.0.1:{adapter_port}",
            predictor_log=predictor.log_path,
            adapter_log=log_dir / "adapter.log",
        )
        env = {
            **os.environ,
            "QWEN_ADAPTER_GENERATION_URL": services.predictor_url,
            "QWEN_ADAPTER_EDIT_URL": "",
        }
        command = [sys.executable, "-m", "openai_adapter", "--port", str(adapter_port)]
        with services.adapter_log.open("w") as log:
            adapter = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_ok(f"{services.adapter_url}/health/ready", adapter, services.adapter_log)
            yield services
        finally:
            adapter.terminate()
            adapter.wait(30)


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile, interpolated (the median for 0.5)."""
    if fraction == 0.5:
        return statistics.median(values)
    return statistics.quantiles(values, n=100, method="inclusive")[round(fraction * 100) - 1]


def line(label: str, values: list[float]) -> str:
    return (
        f"{label:<44}p50 {percentile(values, 0.5):8.1f} ms   p95 {percentile(values, 0.95):8.1f} ms"
    )


def timed(call: Callable[..., bytes], *args: Any) -> tuple[float, bytes]:
    start = time.perf_counter()
    data = call(*args)
    return (time.perf_counter() - start) * 1000, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50, help="requests per path")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured requests per path")
    parser.add_argument("--size", type=int, default=1024, help="width and height")
    parser.add_argument("--steps", type=int, default=2, help="inference steps (at least 2)")
    parser.add_argument("--output-format", default="png", choices=["png", "jpeg", "webp"])
    parser.add_argument("--predictor-url", help="a running generation predictor")
    parser.add_argument("--adapter-url", help="a running adapter in front of it")
    args = parser.parse_args()

    if bool(args.predictor_url) != bool(args.adapter_url):
        parser.error("give both --predictor-url and --adapter-url, or neither")
    if args.predictor_url:
        run(args, Services(args.predictor_url.rstrip("/"), args.adapter_url.rstrip("/")))
        return
    with tempfile.TemporaryDirectory() as log_dir, local_services(Path(log_dir)) as services:
        run(args, services)


def run(args: argparse.Namespace, services: Services) -> None:
    fields = {
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
        "seed": 42,
        "output_format": args.output_format,
    }
    http = httpx.Client(timeout=600)
    infer_url = f"{services.predictor_url}/v2/models/{GENERATION_MODEL_NAME}/infer"

    def direct(request_id: str) -> bytes:
        body = build_rest_body(PROMPT, binary_output=True, request_id=request_id, **fields)
        response = http.post(infer_url, json=body, headers={"x-request-id": request_id})
        response.raise_for_status()
        header_length = int(response.headers[BINARY_HEADER_LENGTH])
        return parse_rest_binary_response(response.content, header_length)[0].data

    def adapter(request_id: str) -> bytes:
        response = http.post(
            f"{services.adapter_url}/v1/images/generations",
            json={"prompt": PROMPT, **fields},
            headers={"x-request-id": request_id},
        )
        response.raise_for_status()
        return base64.b64decode(response.json()["data"][0]["b64_json"])

    paths = {"direct": direct, "adapter": adapter}
    for i in range(args.warmup):
        for name, call in paths.items():
            call(f"warmup-{name}-{i}")
    totals: dict[str, dict[str, float]] = {"direct": {}, "adapter": {}}
    for i in range(args.requests):
        order = list(paths) if i % 2 == 0 else list(paths)[::-1]
        for name in order:
            request_id = f"{name}-{i}"
            totals[name][request_id], data = timed(paths[name], request_id)
        print(f"\r{i + 1}/{args.requests}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    report(args, services, totals, data)


def report(
    args: argparse.Namespace,
    services: Services,
    totals: dict[str, dict[str, float]],
    data: bytes,
) -> None:
    direct_ms, adapter_ms = list(totals["direct"].values()), list(totals["adapter"].values())
    median_direct, median_adapter = statistics.median(direct_ms), statistics.median(adapter_ms)
    print(
        f"adapter overhead: {args.size}x{args.size} {args.output_format} "
        f"({len(data) / 1e6:.2f} MB), {args.steps} steps, {args.requests} requests per path, "
        f"interleaved, after {args.warmup} warm-ups per path"
    )
    print(line("direct v2 (binary outputs), total", direct_ms))
    print(line("through the adapter, total", adapter_ms))
    print(
        f"{'medians: adapter - direct':<44}{median_adapter - median_direct:8.1f} ms   "
        f"ratio adapter/direct {median_adapter / median_direct:.3f}"
    )
    if services.predictor_log is not None:
        inside = model_times(services.predictor_log.read_text())
        outside = {
            name: [total - inside[rid] for rid, total in per_path.items()]
            for name, per_path in totals.items()
        }
        added = [a - d for a, d in zip(outside["adapter"], outside["direct"], strict=True)]
        print(line("inside the predictor's model (both paths)", list(inside.values())))
        print(line("outside the model, direct", outside["direct"]))
        print(line("outside the model, through the adapter", outside["adapter"]))
        print(line("ADDED by the adapter and its hop (paired)", added))
    if services.adapter_log is not None:
        print(line("of which the adapter's own work (its log)", own_work(services.adapter_log)))
    image = Image.open(io.BytesIO(data))
    image.load()
    encode_ms = [timed(encode_image, image, args.output_format, 90)[0] for _ in range(20)]
    print(line(f"output encoding ({args.output_format}, in the predictor)", encode_ms))


def model_times(log: str) -> dict[str, float]:
    """Per request id, KServe's preprocess + predict + postprocess time (its latency log)."""
    pattern = (
        r"requestId: (\S+), preprocess_ms: ([\d.]+), explain_ms: ([\d.]+), "
        r"predict_ms: ([\d.]+), postprocess_ms: ([\d.]+)"
    )
    return {rid: sum(map(float, parts)) for rid, *parts in re.findall(pattern, log)}


def own_work(log: Path) -> list[float]:
    """Per request, the adapter's total time minus its wait for the predictor (its logs)."""
    text = log.read_text()
    hop = dict(re.findall(r"request_id=(adapter-\d+) predictor=\S+ status=200 ([\d.]+)ms", text))
    total = dict(re.findall(r"request_id=(adapter-\d+) POST \S+ 200 ([\d.]+)ms", text))
    return [float(total[rid]) - float(hop[rid]) for rid in hop if rid in total]


if __name__ == "__main__":
    main()
