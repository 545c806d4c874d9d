"""Start-up of a compiling predictor with an empty and with a filled compiler cache.

With ``--compile on`` a predictor compiles its transformer blocks while it loads (the
warm-up). TorchInductor and Triton keep what they compile under ``TORCHINDUCTOR_CACHE_DIR``
and ``TRITON_CACHE_DIR``; the Helm chart's ``predictor.compileCache`` puts them on a
PersistentVolumeClaim so that later pods reuse them. This script loads the predictor in
fresh processes, as new pods would, in pairs: one load into an empty cache directory, then
one that finds it filled by the first. Per load: the seconds ``load()`` took and Inductor's
FX graph cache hits and misses; then the medians and their ratio.

    python bench/compile_cache.py [--loads 3] [predictor flags...]

Without flags it loads the tiny pipeline on the CPU with ``--compile on``; predictor flags
(``--qwen_image_location``, ``--device``, ``--warmup_sizes``, ...) pass through.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in the child process: load the predictor the flags describe, report one JSON line.
CHILD = """
import json, sys, time
from torch._dynamo.utils import counters
from predictors.generation import QwenImageGenerationModel as Model
from predictors.server import build_parser, options_from_args
options = options_from_args(build_parser(Model).parse_args(sys.argv[1:]))
model = Model(Model.default_name, options)
started = time.perf_counter()
model.load()
seconds = time.perf_counter() - started
model.stop()
inductor = counters["inductor"]
print(json.dumps({"load_s": seconds, "fxgraph_cache_hit": inductor["fxgraph_cache_hit"],
                  "fxgraph_cache_miss": inductor["fxgraph_cache_miss"]}))
"""


def load_once(cache_dir: Path, flags: list[str]) -> dict[str, float]:
    """Load the predictor in a new process whose compiler caches live in ``cache_dir``."""
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "torchinductor"),
        "TRITON_CACHE_DIR": str(cache_dir / "triton"),
    }
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise SystemExit(f"the predictor failed to load:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=3, help="loads per cache state (median)")
    args, flags = parser.parse_known_args()
    if "--compile" not in flags:
        flags += ["--compile", "on"]
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        # The first load also builds and saves the tiny pipeline when no location is given:
        # an untimed load into a throwaway cache keeps that out of the figures.
        load_once(scratch_dir / "untimed", [*flags, "--tiny_cache_dir", str(scratch_dir)])
        flags += ["--tiny_cache_dir", str(scratch_dir)]
        results: dict[str, list[dict[str, float]]] = {"empty": [], "filled": []}
        for index in range(args.loads):
            cache = scratch_dir / f"cache-{index}"
            results["empty"].append(load_once(cache, flags))  # a new pod, a new cache
            results["filled"].append(load_once(cache, flags))  # a new pod, the same cache
    for state, loads in results.items():
        print(json.dumps({"cache": state, "loads": loads}))
    empty = statistics.median(load["load_s"] for load in results["empty"])
    filled = statistics.median(load["load_s"] for load in results["filled"])
    print(
        f"load with an empty cache {empty:.1f} s, with a filled one {filled:.1f} s "
        f"(median of {args.loads}): {empty / filled:.2f}x faster"
    )


if __name__ == "__main__":
    main()
