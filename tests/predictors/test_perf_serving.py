"""Cross-request batching through a real predictor server: concurrent requests with different
prompts give the pixels they get alone; the Helm chart's speed settings configure a real
predictor; and the benchmark harness runs end to end."""

from __future__ import annotations

import ast
import io
import itertools
import json
import re
import shlex
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from packaging.utils import canonicalize_name
from PIL import Image

from bench import gpu_pipelines, timing
from predictors import contract
from tests import test_chart as chart
from tests.servers import PROJECT_ROOT, run_predictor
from tests.test_dockerfile import locked_versions, pinned_versions

REQUESTS = (
    {"prompt": "a lighthouse on a cliff at dusk, oil painting", "seed": 1, "num_images": 2},
    {"prompt": "a cat", "seed": 2},
    {"prompt": "a bowl of ramen", "seed": 3, "negative_prompt": "blurry"},
)
FAST = {"width": 64, "height": 64, "num_inference_steps": 2}


def post(url: str, fields: dict) -> list[np.ndarray]:
    fields = {**fields}
    body = contract.build_rest_body(fields.pop("prompt"), **FAST, **fields)
    response = httpx.post(url, json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [
        np.asarray(Image.open(io.BytesIO(result.data)), dtype=np.int16)
        for result in contract.parse_rest_response(response.json())
    ]


def batch_histogram(url: str) -> tuple[float, float]:
    """(batches, requests) counted by the server's batch-size histogram."""
    metrics = httpx.get(f"{url}/metrics").text
    count = re.search(r'qwen_image_batch_requests_count\{model_name="qwen-image"\} (\S+)', metrics)
    total = re.search(r'qwen_image_batch_requests_sum\{model_name="qwen-image"\} (\S+)', metrics)
    return float(count.group(1)), float(total.group(1))


def test_concurrent_requests_are_batched_and_match_sequential_ones(tiny_cache_env, log_dir):
    flags = ("--min_size=64", "--max_batch_size=8", "--batch_wait_ms=1000")
    with run_predictor(
        "predictors.generation", "qwen-image", log_dir, *flags, env=tiny_cache_env
    ) as predictor:
        concurrent: dict[int, list[np.ndarray]] = {}

        def send(index: int) -> None:
            concurrent[index] = post(predictor.infer_url, REQUESTS[index])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(REQUESTS))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert batch_histogram(predictor.url) == (1.0, 3.0), "one batch of three requests"

        for index, fields in enumerate(REQUESTS):
            alone = post(predictor.infer_url, fields)
            assert len(alone) == len(concurrent[index]) == fields.get("num_images", 1)
            for batched, single in zip(concurrent[index], alone, strict=True):
                assert np.abs(batched - single).max() <= 1
        assert batch_histogram(predictor.url) == (4.0, 6.0)


def test_chart_speed_settings_configure_a_real_predictor(
    tiny_cache_env, tiny_lora, tmp_path, log_dir
):
    """The chart's tiny case with batching and a LoRA: the predictor started with exactly the
    rendered environment (cache paths moved off the pod's /cache) batches and fuses."""
    values = chart.case_values("tiny")
    values["predictor"]["performance"] = {"maxBatchSize": 4, "batchWaitMs": 2000}
    values["generation"]["lora"] = {"source": str(tiny_lora), "steps": 2}
    isvc = chart.one(chart.render_values(values), "InferenceService", chart.GENERATION)
    env = chart.env_values(chart.container(isvc))
    assert (env["QWEN_MAX_BATCH_SIZE"], env["QWEN_LORA"]) == ("4", str(tiny_lora))
    env |= tiny_cache_env | {"HF_HOME": str(tmp_path / "hf"), "TRITON_CACHE_DIR": str(tmp_path)}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")

    with run_predictor("predictors.generation", "qwen-image", log_dir, env=env) as predictor:
        assert f"Fused the LoRA {tiny_lora}" in predictor.log()
        body = contract.build_rest_body("a cat", width=256, height=256)  # the LoRA's 2 steps
        statuses: list[int] = []

        def send() -> None:
            statuses.append(httpx.post(predictor.infer_url, json=body, timeout=120).status_code)

        threads = [threading.Thread(target=send) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200, 200]
        assert batch_histogram(predictor.url) == (1.0, 2.0), "one batch of both requests"


def run_harness_on_the_cpu(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``bench/gpu_pipelines.py --smoke`` with ``args``: its process, and its JSON results."""
    results_path = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, "bench/gpu_pipelines.py", "--smoke", *args, "--json", str(results_path)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed, json.loads(results_path.read_text())


@pytest.mark.parametrize(
    "case",
    [
        "edit2-64x64",  # Qwen-Image-Edit-2509's: against QwenImageEditPlusPipeline's call
        "inpaint-1024x1024",  # named (not in the smoke default): QwenImageEditInpaintPipeline's
    ],
)
def test_the_gpu_harness_compares_other_edits_with_their_pipelines(tmp_path, case):
    _, results = run_harness_on_the_cpu(
        tmp_path, "--runs", f"{case}=baseline,engine", "--batch-sizes", "none"
    )
    rows = {row["mode"]: row for row in results["rows"] if row["case"] == case}
    assert rows["baseline"]["seconds_per_image"] > 0
    assert rows["engine"]["max_abs_diff"] < 1e-5
    assert rows["engine"]["seconds_per_image"] > 0


def next_gpu_run_commands() -> list[list[str]]:
    """The harness commands of docs/performance.md's "The next GPU run", as argument lists
    (continuation lines joined; the shell's redirection and pipe left out)."""
    text = (PROJECT_ROOT / "docs" / "performance.md").read_text()
    section = text.split("### The next GPU run", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        command = block.replace("\\\n", " ").split("2>&1", 1)[0]
        words = shlex.split(command)
        assert words[:2] == ["python", "bench/gpu_pipelines.py"], words
        commands.append(words[2:])
    return commands


def test_the_next_gpu_runs_name_cases_and_modes_the_harness_knows():
    """A lent GPU's minutes are few: each prepared command parses, and every case and mode
    it names exists, before a device runs it."""
    commands = next_gpu_run_commands()
    assert len(commands) >= 5
    for argv in commands:
        plan = gpu_pipelines.plan_runs(gpu_pipelines.parse_args(argv))
        assert plan and all(cases and modes for cases, modes in plan), argv
    with pytest.raises(SystemExit, match="unknown cases: inpaint-64x64"):
        gpu_pipelines.plan_runs(gpu_pipelines.parse_args(["--runs", "inpaint-64x64=engine"]))


# What a lent GPU machine has of the modules the harness imports (docs/performance.md,
# "Running the harness on a lent GPU"); the rest travels as bench/gpu-wheels.txt's wheels.
ON_THE_GPU_MACHINE = {
    "torch",
    "numpy",
    "PIL",
    "safetensors",
    "tokenizers",
    "peft",
    "huggingface_hub",
}


def harness_imports() -> dict[str, set[str]]:
    """The third-party modules that the harness and the project modules it reaches import,
    at module level or inside functions: each top-level name, with the files importing it."""
    found: dict[str, set[str]] = {}
    files, seen = [PROJECT_ROOT / "bench" / "gpu_pipelines.py"], set()
    while files:
        path = files.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in ("bench", "predictors"):  # the module, and each package's __init__
                    parts = name.split(".")
                    modules = [PROJECT_ROOT / (name.replace(".", "/") + ".py")] + [
                        PROJECT_ROOT.joinpath(*parts[:end], "__init__.py")
                        for end in range(1, len(parts) + 1)
                    ]
                    files += [module for module in modules if module.exists()]
                elif top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(path.relative_to(PROJECT_ROOT).as_posix())
    return found


def test_the_gpu_wheels_hold_what_the_harness_imports_and_the_lent_machine_lacks():
    """A lent GPU's minutes are few: an import the carried wheels miss costs a call (run 9
    lost two to pybase64 and pydantic_core, which predictors/contract.py had come to need)."""
    wheels = pinned_versions(PROJECT_ROOT / "bench" / "gpu-wheels.txt")
    imports = harness_imports()
    assert {"diffusers", "torch", "pybase64"} <= imports.keys(), imports  # the scan reaches
    missing = {
        module: files
        for module, files in imports.items()
        if module not in ON_THE_GPU_MACHINE and canonicalize_name(module) not in wheels
    }
    assert not missing, f"add their wheels to bench/gpu-wheels.txt: {missing}"
    lock = locked_versions("predictor")
    for name, version in wheels.items():
        if name != "torchao":  # torchao follows the machine's torch, not the lock's
            assert version == lock[name], (
                f"{name}: {version} in bench/gpu-wheels.txt, locked {lock[name]}"
            )


def test_the_device_sampler_gives_the_medians_of_its_readings_while_entered():
    """What the harness reports of a GPU's clock and power during a mode's timed runs; off
    CUDA there is nothing to read, and nothing is reported."""
    readings = itertools.cycle([(1980.0, 650.0), (1755.0, 700.0), (1830.0, 690.0)])
    with timing.DeviceSampler(lambda: next(readings), interval=0.01) as sampler:
        time.sleep(0.2)
    taken = len(sampler.samples)
    time.sleep(0.05)
    assert len(sampler.samples) == taken >= 3, "sampling ends on leaving"
    medians = sampler.medians()
    assert medians["samples"] == taken
    assert medians["sm_clock_mhz"] in (1980.0, 1755.0, 1830.0)
    assert 650.0 <= medians["power_w"] <= 700.0
    assert timing.nvml_reader(torch.device("cpu")) is None
    with timing.DeviceSampler(None) as idle:
        pass
    assert idle.medians() == {}


def test_the_gpu_harness_runs_on_the_cpu_in_smoke_mode(tmp_path):
    completed, results = run_harness_on_the_cpu(
        tmp_path, "--profile", "--cases", "64x64,edit-64x64"
    )
    rows = {(row["case"], row["mode"]): row for row in results["rows"]}
    for case in ("64x64", "edit-64x64"):
        assert rows[(case, "baseline")]["seconds_per_image"] > 0
        assert rows[(case, "engine")]["max_abs_diff"] < 1e-5  # batched CFG = two passes
        assert rows[(case, "engine")]["sm_clock_mhz"] is None  # no GPU clock on a CPU
        assert rows[(case, "lightning")]["steps"] == 8
        for mode in ("baseline", "engine", "lightning"):  # the call = before + loop + after
            row = rows[(case, mode)]
            parts = (
                row["before_loop_seconds"]
                + row["steps"] * row["seconds_per_step"]
                + row["after_loop_seconds"]
            )
            assert row["after_loop_seconds"] > 0
            assert parts == pytest.approx(row["seconds_per_image"], rel=0.05, abs=0.005), row
        assert rows[(case, "engine+compile")]["max_abs_diff"] < 1e-4  # compiled on the CPU
        # three previews an image (a stream's partial_images) leave the image as it was
        previewed = rows[(case, "engine+compile+previews")]
        assert previewed["max_abs_diff"] == rows[(case, "engine+compile")]["max_abs_diff"]
        # compiled anew with CUDA graphs asked for (on a CPU Inductor declines to capture)
        assert rows[(case, "engine+compile+graphs")]["max_abs_diff"] < 1e-4
        assert rows[(case, "engine+compile+autotune")]["max_abs_diff"] < 1e-4  # compiled anew
        fp8_note = rows[(case, "lightning+fp8+compile")]["note"]
        assert fp8_note.startswith("skipped: --quantization fp8 needs a CUDA GPU"), fp8_note
    warmups = {(entry["case"], entry["mode"]): entry for entry in results["warmups"]}
    for case in ("64x64", "edit-64x64"):
        # the predictor's warm-up compiles what the case needs: its own runs compile nothing
        assert warmups[(case, "engine+compile")]["graphs_in_warmup"] > 0
        assert warmups[(case, "engine+compile")]["graphs_after_warmup"] == 0
        graphs = warmups[(case, "engine+compile+graphs")]
        assert graphs["graphs_in_warmup"] > 0 and graphs["graphs_after_warmup"] == 0
        assert graphs["cudagraph_skips"] > 0 and graphs["cudagraph_recorded_non_static_inputs"] == 0
        # a request of texts no earlier call padded to: timed, and nothing compiles
        assert graphs["new_shape_text_tokens"] % 64 == 0, graphs
        assert graphs["new_shape_first_call_s"] > 0 and graphs["graphs_in_new_shape"] == 0
    assert rows[("batch8-64x64", "engine")]["max_abs_diff"] < 1e-5
    lightning_batch = rows[("batch8-64x64", "lightning")]  # its own steps, no CFG
    assert lightning_batch["steps"] == 8 and lightning_batch["max_abs_diff"] < 1e-5
    assert "original service not measured" in lightning_batch["note"]
    assert "original service in turn" in rows[("batch8-64x64", "engine")]["note"]
    assert {floor["case"] for floor in results["floors"]} == {"64x64", "edit-64x64"}
    floors = {floor["case"]: floor for floor in results["floors"]}
    # the tokenizer knows the prompts' words: " " is 6 tokens, as with Qwen's (301 bytes-wise)
    prompt_tokens, negative_tokens = floors["64x64"]["text_tokens"]
    assert negative_tokens == 6 and prompt_tokens < 60
    assert all(floor["floor_seconds_per_step"] > 0 for floor in results["floors"])
    native = {e["padding"]: e for e in results["attention"] if e["backend"] == "native"}
    assert all("ms" in native[padding] for padding in ("none", "mask", "split")), native
    assert "| 64x64 | engine |" in completed.stdout
    profiles = {(entry["case"], entry["mode"]): entry for entry in results["profiles"]}
    for mode in ("baseline", "engine"):
        profile = profiles[("64x64", mode)]
        assert profile["matmul_ms"] > 0 and profile["attention_ms"] > 0
        assert profile["total_ms"] >= profile["matmul_ms"] + profile["attention_ms"]
    parts = {entry["case"]: entry for entry in results["parts"]}
    assert len(parts) == len(results["parts"]), "each size and kind is timed once"
    # batch8-64x64 is 64x64's; Lightning encodes no negative prompt
    for name in ("64x64", "64x64, no CFG", "edit-64x64", "batch8-128x128"):
        assert parts[name]["encode_request_s"] > 0 and parts[name]["decode_image_s"] > 0
        assert parts[name]["modulation_table_s"] > 0  # the engine's one product a request
        assert parts[name]["vae_decode_diffusers_s"] > 0 and parts[name]["vae_decode_2d_s"] > 0
        assert parts[name]["vae_decode_2d_max_diff"] < 1e-5
        assert parts[name]["vae_encode_2d_max_diff"] < 1e-5


def test_the_harness_can_warm_up_compiled_modes_on_the_case_alone(tmp_path):
    """``--compile-warmup case``: one compile per case (the predictor's warm-up makes two,
    for one and two requests), after which the case's runs compile nothing; a new text
    length, which would compile, is not timed. Progress lines say what each mode is at."""
    completed, results = run_harness_on_the_cpu(
        tmp_path,
        *("--runs", "64x64=engine+compile,engine+compile+graphs", "--batch-sizes", "none"),
        *("--compile-warmup", "case"),
    )
    # where the time went, stage by stage, for a run stopped at its time limit
    stages = re.findall(r"^progress [\d.]+ s: engine\+compile: (.*)$", completed.stdout, re.M)
    assert stages == ["preparing", "warming up at 64x64", "timing 64x64"], stages
    for warmup in results["warmups"]:
        assert warmup["warmup"] == "case"
        assert warmup["graphs_in_warmup"] == 1 and warmup["graphs_after_warmup"] == 0
    plain, graphs = results["warmups"]
    assert "new_shape" not in plain and graphs["new_shape"].startswith("not measured")
    assert [row["mode"] for row in results["rows"]] == ["engine+compile", "engine+compile+graphs"]
    assert all(row["seconds_per_image"] > 0 for row in results["rows"])


def test_a_filled_compiler_cache_serves_a_new_process():
    """bench/compile_cache.py end to end: a new process finds in the compiler cache (the
    chart's predictor.compileCache) the blocks an earlier one compiled."""
    completed = subprocess.run(
        [sys.executable, "bench/compile_cache.py", "--loads", "1", "--warmup_sizes", "256x256"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    (empty,) = next(line["loads"] for line in lines if line["cache"] == "empty")
    (filled,) = next(line["loads"] for line in lines if line["cache"] == "filled")
    assert empty["fxgraph_cache_miss"] > 0 and empty["fxgraph_cache_hit"] == 0
    assert filled["fxgraph_cache_hit"] == empty["fxgraph_cache_miss"]
    assert filled["fxgraph_cache_miss"] == 0
