"""Memory the adapter spends on one edit at the upload limit: its peak while the edit is read,
checked and sent on, and what it still holds while the predictor works, against the size of
the edit's body (the unit of ``QWEN_ADAPTER_MAX_UPLOAD_BYTES_IN_FLIGHT``).

The adapter runs under uvicorn in a process of its own with ``tracemalloc`` on; a stand-in
predictor in another process reads each infer body, holds it for ``--hold`` seconds and
answers with a small image. Edits are sent as the openai SDK sends them (multipart, the image
as a file, and as 16 files of up to 1 MiB, which Starlette keeps in memory where it spools
larger ones to disk) and as a JSON edit with the image as a base64 data URL.

    python bench/adapter_memory.py [--upload-mib 20] [--repeats 5]

With ``--burst N`` it sends N such JSON edits at once instead, against the default
``QWEN_ADAPTER_MAX_UPLOAD_BYTES_IN_FLIGHT``, and reports their answers and the adapter
process's peak resident memory (Linux's ``VmHWM``) before and after.

With ``--answer-images N`` it measures the other direction instead: generations whose
answer is N images of ``--answer-mib`` each, the adapter's peak while it turns them into
OpenAI's JSON and what it still holds once the answer is sent, against the images' bytes.
The adapter runs with the garbage collector off, so that what only a collection would free
(objects in reference cycles) shows as held.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import multiprocessing
import statistics
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from openai_adapter.app import create_app
from openai_adapter.settings import Settings
from predictors import contract
from tests.servers import free_port

MIB = 1024 * 1024
MEMORY_PATH = "/_memory"
# The largest uploaded file that Starlette keeps in memory (1 MiB) rather than on disk.
SPOOLED_BYTES = MIB


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def answer_image(size: int) -> bytes:
    """A PNG file of ``size`` bytes (at least a small one's): a small image, then padding,
    which readers of its header ignore."""
    image = small_png()
    return image + bytes(max(0, size - len(image)))


def run_predictor(port: int, hold_seconds: float, images: int = 1, image_bytes: int = 0) -> None:
    """A stand-in predictor: reads the whole infer body, waits, answers ``images`` images
    of ``image_bytes`` each (raw, as KServe's binary extension sends them)."""
    image = answer_image(image_bytes)
    tensor = (len(image).to_bytes(4, "little") + image) * images
    header = json.dumps(
        {
            "outputs": [
                {
                    "name": contract.IMAGES,
                    "shape": [images],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(tensor)},
                },
                {
                    "name": contract.SEEDS,
                    "shape": [images],
                    "datatype": "INT64",
                    "data": list(range(images)),
                },
            ]
        }
    ).encode()
    answer = header + tensor

    async def infer(request: Request) -> Response:
        async for _ in request.stream():
            pass
        await asyncio.sleep(hold_seconds)
        headers = {contract.BINARY_HEADER_LENGTH: str(len(header))}
        return Response(answer, headers=headers, media_type="application/octet-stream")

    async def ready(request: Request) -> Response:
        return Response()

    app = Starlette(
        routes=[
            Route("/v2/models/{model}/infer", infer, methods=["POST"]),
            Route("/v2/models/{model}/ready", ready),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def run_adapter(
    port: int, predictor_url: str, max_upload_bytes: int, collect_garbage: bool = True
) -> None:
    """The adapter, with ``GET /_memory`` answering tracemalloc's figures (``?reset=1``:
    and starting a new peak); ``collect_garbage=False`` turns the garbage collector off."""
    settings = Settings(
        generation_url=predictor_url, edit_url=predictor_url, max_upload_bytes=max_upload_bytes
    )
    adapter = create_app(settings)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == MEMORY_PATH:
            current, peak = tracemalloc.get_traced_memory()
            if scope["query_string"] == b"reset=1":
                tracemalloc.reset_peak()
            await JSONResponse({"current": current, "peak": peak})(scope, receive, send)
            return
        await adapter(scope, receive, send)

    if not collect_garbage:
        gc.disable()
    tracemalloc.start()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def wait_ready(url: str, process: multiprocessing.Process) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.is_alive():
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def png_file(size: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + bytes(size - 8)


def multipart_edit(files: list[bytes]) -> tuple[bytes, str]:
    """A multipart edit of ``files``, as the openai SDK sends a list: body and type."""
    request = httpx.Request(
        "POST",
        "http://adapter/v1/images/edits",
        data={"prompt": "add a hat"},
        files=[("image[]", (f"photo{i}.png", file, "image/png")) for i, file in enumerate(files)],
    )
    return request.read(), request.headers["content-type"]


def edit_bodies(upload_bytes: int) -> dict[str, tuple[bytes, str]]:
    """The shapes of an edit whose image files take at most ``upload_bytes``: body and type."""
    image = png_file(upload_bytes)
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    as_json = json.dumps({"prompt": "add a hat", "images": [{"image_url": data_url}]}).encode()
    return {
        "multipart": multipart_edit([image]),
        "multipart16": multipart_edit([png_file(min(upload_bytes // 16, SPOOLED_BYTES))] * 16),
        "json": (as_json, "application/json"),
    }


def measure(
    adapter_url: str, body: bytes, content_type: str, hold_seconds: float
) -> dict[str, int]:
    """One edit: the adapter's traced memory before it, its peak during it, and what it held
    halfway through the predictor's hold (the body is sent by then)."""
    with httpx.Client(timeout=120) as http:
        before = http.get(adapter_url + MEMORY_PATH + "?reset=1").json()["current"]
        answer: dict[str, Any] = {}

        def send() -> None:
            answer["response"] = http.post(
                adapter_url + "/v1/images/edits",
                content=body,
                headers={"content-type": content_type},
            )

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(hold_seconds / 2 + 0.5)
        with httpx.Client(timeout=10) as probe:
            held = probe.get(adapter_url + MEMORY_PATH).json()["current"]
        sender.join()
        response = answer["response"]
        if response.status_code != 200:
            raise RuntimeError(f"edit failed: {response.status_code} {response.text[:300]}")
        peak = http.get(adapter_url + MEMORY_PATH).json()["peak"]
    return {"peak": peak - before, "held": held - before}


def measure_answer(adapter_url: str, images: int) -> dict[str, int]:
    """One generation of ``images`` images: the adapter's peak during it and what it still
    holds after its answer is sent, both above its traced memory before it. The answer is
    read in chunks and dropped, so this process keeps none of it."""
    with httpx.Client(timeout=120) as http:
        before = http.get(adapter_url + MEMORY_PATH + "?reset=1").json()["current"]
        request = {"prompt": "a lighthouse", "n": images, "size": "1024x1024"}
        with http.stream("POST", adapter_url + "/v1/images/generations", json=request) as answer:
            received = sum(len(chunk) for chunk in answer.iter_bytes())
            if answer.status_code != 200:
                raise RuntimeError(f"generation failed: {answer.status_code}")
        after = http.get(adapter_url + MEMORY_PATH).json()
    return {"peak": after["peak"] - before, "held": after["current"] - before, "body": received}


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (Linux's ``VmHWM``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM")


def burst(adapter_url: str, body: bytes, content_type: str, clients: int) -> Counter[int]:
    """The statuses of ``clients`` edits sent at once."""
    statuses: list[int] = []

    def send() -> None:
        with httpx.Client(timeout=300) as http:
            response = http.post(
                adapter_url + "/v1/images/edits",
                content=body,
                headers={"content-type": content_type},
            )
            statuses.append(response.status_code)

    threads = [threading.Thread(target=send) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Counter(statuses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upload-mib", type=float, default=20, help="the image file's size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hold", type=float, default=2.0, help="seconds the predictor holds")
    parser.add_argument("--burst", type=int, default=0, help="JSON edits to send at once")
    parser.add_argument(
        "--answer-images", type=int, default=0, help="measure generations of this many images"
    )
    parser.add_argument("--answer-mib", type=float, default=8, help="each answer image's size")
    args = parser.parse_args()
    upload_bytes = int(args.upload_mib * MIB)
    answer_bytes = int(args.answer_mib * MIB)

    context = multiprocessing.get_context("spawn")
    predictor_port, adapter_port = free_port(), free_port()
    predictor_url = f"http://127.0.0.1:{predictor_port}"
    adapter_url = f"http://127.0.0.1:{adapter_port}"
    answers_measured = args.answer_images > 0
    # Edits are answered with one small image, so that their figures are the upload's.
    answer = (args.answer_images, answer_bytes) if answers_measured else (1, 0)
    predictor_args = (predictor_port, args.hold, *answer)
    adapter_args = (adapter_port, predictor_url, upload_bytes, not answers_measured)
    processes = [
        context.Process(target=run_predictor, args=predictor_args, daemon=True),
        context.Process(target=run_adapter, args=adapter_args, daemon=True),
    ]
    for process in processes:
        process.start()
    try:
        wait_ready(predictor_url + "/v2/models/m/ready", processes[0])
        wait_ready(adapter_url + "/health/live", processes[1])
        if answers_measured:
            report_answers(adapter_url, args.answer_images, answer_bytes, args.repeats)
            return
        bodies = edit_bodies(upload_bytes)
        if args.burst:
            before = peak_rss_mib(processes[1].pid)
            answers = burst(adapter_url, *bodies["json"], args.burst)
            budget = Settings().max_upload_bytes_in_flight
            print(
                f"{args.burst} JSON edits of {len(bodies['json'][0]) / MIB:.1f} MiB at once, "
                f"{budget / MIB:.0f} MiB of bodies allowed at once: answers "
                f"{dict(sorted(answers.items()))}; adapter peak RSS {before:.0f} MiB before, "
                f"{peak_rss_mib(processes[1].pid):.0f} MiB after"
            )
            return
        print(
            f"image files {upload_bytes / MIB:.1f} MiB in all; median of {args.repeats} edits "
            "of each shape, after one more"
        )
        print(
            f"{'edit body':>11} {'body MiB':>9} {'peak MiB':>9} {'x body':>7} {'held MiB':>9}"
            f" {'x body':>7}"
        )
        for name, (body, content_type) in bodies.items():
            measure(adapter_url, body, content_type, args.hold)  # one-time allocations
            runs = [
                measure(adapter_url, body, content_type, args.hold) for _ in range(args.repeats)
            ]
            peak = statistics.median(run["peak"] for run in runs)
            held = statistics.median(run["held"] for run in runs)
            print(
                f"{name:>11} {len(body) / MIB:>9.1f} {peak / MIB:>9.1f} {peak / len(body):>7.2f}"
                f" {held / MIB:>9.1f} {held / len(body):>7.2f}"
            )
    finally:
        for process in processes:
            process.terminate()
            process.join()


def report_answers(adapter_url: str, images: int, image_bytes: int, repeats: int) -> None:
    """Print the median peak and held memory of ``repeats`` generations of ``images``
    images, after one more, against the images' bytes."""
    answer_bytes = images * len(answer_image(image_bytes))
    measure_answer(adapter_url, images)  # one-time allocations
    runs = [measure_answer(adapter_url, images) for _ in range(repeats)]
    peak = statistics.median(run["peak"] for run in runs)
    held = statistics.median(run["held"] for run in runs)
    print(
        f"{images} images of {image_bytes / MIB:.1f} MiB, {answer_bytes / MIB:.1f} MiB in all; "
        f"median of {repeats} generations after one more, garbage collector off"
    )
    print(f"{'':>7} {'MiB':>9} {'x images':>9}")
    for name, value in (("body", runs[0]["body"]), ("peak", peak), ("held", held)):
        print(f"{name:>7} {value / MIB:>9.1f} {value / answer_bytes:>9.2f}")


if __name__ == "__main__":
    main()
