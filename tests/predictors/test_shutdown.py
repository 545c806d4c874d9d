"""Stopping a predictor: the requests it accepted finish first, within the grace period."""

from __future__ import annotations

import signal
import threading

import httpx

from predictors import contract
from tests.servers import run_predictor, wait_for_queue_depth

# A request of several seconds on the tiny CPU pipeline, to be in flight at SIGTERM.
SLOW = {"width": 1024, "height": 1024, "num_inference_steps": 8}


def answer_after_sigterm(tiny_cache_env: dict[str, str], log_dir, grace_seconds: int) -> int:
    """Start a predictor, send it a slow request, SIGTERM it once the request runs; the
    request's HTTP status (0: no answer) after the process exits."""
    env = {**tiny_cache_env, "QWEN_SHUTDOWN_GRACE_SECONDS": str(grace_seconds)}
    with run_predictor("predictors.generation", "qwen-image", log_dir, env=env) as predictor:
        answer: dict[str, int] = {}

        def slow_request() -> None:
            body = contract.build_rest_body("in flight at SIGTERM", **SLOW)
            try:
                answer["status"] = httpx.post(
                    predictor.infer_url, json=body, timeout=120
                ).status_code
            except httpx.HTTPError:
                answer["status"] = 0

        client = threading.Thread(target=slow_request)
        client.start()
        wait_for_queue_depth(predictor, 1)
        predictor.process.send_signal(signal.SIGTERM)
        client.join(timeout=120)
        assert predictor.process.wait(timeout=120) == 0
    return answer["status"]


def test_sigterm_lets_an_accepted_request_finish(tiny_cache_env, log_dir):
    assert answer_after_sigterm(tiny_cache_env, log_dir, grace_seconds=120) == 200


def test_the_grace_period_bounds_the_wait(tiny_cache_env, log_dir):
    """KServe's server cancels what is left after the grace period (its default is 30 s,
    shorter than a queue of large images: hence the predictor's own, longer default)."""
    assert answer_after_sigterm(tiny_cache_env, log_dir, grace_seconds=1) != 200
