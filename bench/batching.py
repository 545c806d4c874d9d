"""Throughput of a real predictor server under concurrent clients: cross-request batching on
against sequential serving (``--max_batch_size 1``), same load, same server otherwise.

Each client sends its requests one after another (a closed loop), all clients at once; the
figure is images per second over the whole run, and the median request latency. Without a
location the server runs the tiny random-weight pipeline, whose figures (on a CPU above all)
say nothing about a GPU: the GPU figures come from ``bench/gpu_pipelines.py``'s batching case.

    python bench/batching.py [--sizes 512,1024] [--clients 8] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.gpu_pipelines import BATCH_PROMPTS as PROMPTS
from predictors import contract
from tests.servers import run_predictor


def load(url: str, size: int, clients: int, per_client: int, steps: int) -> dict[str, float]:
    """Run ``clients`` closed-loop clients at once; throughput and latencies."""
    latencies: list[float] = []
    failures: list[str] = []

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            for turn in range(per_client):
                body = contract.build_rest_body(
                    PROMPTS[(index + turn) % len(PROMPTS)],
                    width=size,
                    height=size,
                    num_inference_steps=steps,
                    seed=index * 1000 + turn,
                    binary_output=True,
                )
                started = time.perf_counter()
                response = http.post(url, json=body)
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, first: {failures[0]}")
    return {
        "seconds": seconds,
        "images_per_second": clients * per_client / seconds,
        "median_latency_s": statistics.median(latencies),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512,1024", help="square image sizes")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-wait-ms", type=float, default=100)
    parser.add_argument("--location", help="pipeline directory (default: the tiny pipeline)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    common = [
        f"--max_queue_size={args.clients}",
        # Only ever raised: the limits must allow the default size, 1664x928.
        f"--max_size={max(*sizes, contract.Limits().max_size)}",
        f"--batch_wait_ms={args.batch_wait_ms}",
    ]
    if args.location:
        common.append(f"--qwen_image_location={args.location}")
    results = []
    log_dir = Path(tempfile.mkdtemp(prefix="qwen-batching-"))
    print(f"predictor logs: {log_dir}", file=sys.stderr, flush=True)
    for label, batch in (("sequential", 1), ("batched", args.clients)):
        with run_predictor(
            "predictors.generation", "qwen-image", log_dir, *common, f"--max_batch_size={batch}"
        ) as predictor:
            for size in sizes:
                load(predictor.infer_url, size, 1, 1, args.steps)  # warm-up
                figures = load(
                    predictor.infer_url, size, args.clients, args.requests_per_client, args.steps
                )
                row = {"mode": label, "size": size, "steps": args.steps, **figures}
                results.append(row)
                print(json.dumps(row), flush=True)
    for size in sizes:
        by_mode = {row["mode"]: row for row in results if row["size"] == size}
        speedup = (
            by_mode["batched"]["images_per_second"] / by_mode["sequential"]["images_per_second"]
        )
        print(f"{size}x{size}: batched serves {speedup:.2f}x the images per second", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
