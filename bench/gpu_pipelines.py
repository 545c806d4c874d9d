"""Qwen-Image and Qwen-Image-Edit on one GPU: diffusers' plain pipeline call (the original
service) against this project's engine (``predictors.denoise``) and speed modes
(``predictors.acceleration``), side by side in one run.

No weights are downloaded: the pipelines are full size with random bf16 weights (the real
transformer and VAE configs, Qwen2.5-VL-7B-Instruct's published config for the text
encoder, an offline tokenizer from ``predictors.tiny`` that learnt the words of the harness's
prompts and the pipelines' prompt templates, so texts are about as long as Qwen's tokenizer
makes them). A step's compute does not depend on the weights' values, so the timings are
real; the images are noise.

Per case and mode: seconds per image (median), seconds per step, the seconds before the
loop and after it, peak GPU memory, and the difference from the baseline's image on the same
seed. Compiled modes first run the predictor's load-time warm-up at the case's size
(``acceleration.warmup_batches``; with ``--compile-warmup case``, the case's request alone,
one compile where the predictor's warm-up makes two or three): its seconds, and how many
graphs the case's own runs compiled after it (0: none stalled); with CUDA graphs, also
Inductor's CUDA graph counters and what the first request of a new text length pays to
record its shape. Per case: the bf16 compute floor of a step (FLOPs from the model config /
the matmul rate measured here).
Then the throughput of 8 requests as one batch against 8 in turn, and an attention-backend
sweep at the cases' shapes.
With ``--profile``, each case and mode also gets a profile of one step (device time in
matrix products, attention and the rest) and the time of the work around the loop (prompt
encoding, VAE decoding).

    python bench/gpu_pipelines.py                       # every case and mode (too long for
                                                        # one 10-minute call: see docs)
    python bench/gpu_pipelines.py --cases 1328x1328 --modes baseline,engine,engine+compile
    python bench/gpu_pipelines.py --runs 1328x1328=baseline,engine \
                                  --runs 1024x1024=lightning+fp8+compile   # one build
    python bench/gpu_pipelines.py --smoke               # tiny pipelines on the CPU, seconds

Imports: torch, diffusers, transformers, numpy, PIL and the kserve-free ``predictors``
modules, so it runs on a GPU host from carried wheels.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers
import numpy as np
import torch
import transformers
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditInpaintPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.models.attention_dispatch import attention_backend, dispatch_attention_fn
from PIL import Image
from safetensors.torch import save_file
from torch._dynamo.utils import counters
from torch.utils.hooks import RemovableHandle
from transformers import AutoImageProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from bench.timing import DeviceSampler, median_seconds, nvml_reader, synchronize
from bench.vae_single_frame import compare as compare_vae_paths
from predictors import acceleration, feedforward, modulation, tiny
from predictors import attention as padding_free
from predictors.acceleration import LIGHTNING, Acceleration
from predictors.denoise import (
    AttentionBackends,
    Job,
    condition,
    decode,
    generate,
    padded_text_length,
    takes_several_images,
)

# Qwen/Qwen2.5-VL-7B-Instruct's published config.json (Qwen-Image's text encoder), as data.
# The special token ids are set from the offline tokenizer at build time.
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "text_config": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "max_window_layers": 28,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
    },
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "vocab_size": 152064,
}
# Qwen-Image-Edit's image processor: the tiny one's settings with the real pixel bounds.
IMAGE_PROCESSOR_CONFIG = {
    **tiny.TINY_IMAGE_PROCESSOR_CONFIG,
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 16384,
}

PROMPT = (
    "A coffee shop entrance with a chalkboard sign reading 'Qwen Coffee $2 per cup', a neon "
    "light beside it reading 'Open', and a poster of a girl drinking coffee; photorealistic"
)
NEGATIVE_PROMPT = " "
EDIT_PROMPT = "Change the sign to read 'Closed' and make the light blue"
SEED = 42
TRUE_CFG_SCALE = 4.0
# Prompts of different lengths for the batching case.
BATCH_PROMPTS = (
    "a red cube",
    "a lighthouse on a cliff at dusk, oil painting",
    "a bowl of ramen",
    "an astronaut riding a horse on the moon, 35mm photo, film grain",
    "a cat",
    "a city street in the rain at night with neon reflections",
    "a watercolor fox",
    "a mountain lake at sunrise with mist over the water",
)


@dataclass(frozen=True)
class Case:
    """One benchmark shape: an output size, for generation or for an edit from
    ``input_images`` images (two or more: ``QwenImageEditPlusPipeline``, Qwen-Image-Edit-2509's).
    A ``masked`` edit repaints the left half of a square image (its output is 1024x1024) and
    compares with ``QwenImageEditInpaintPipeline``'s call."""

    name: str
    width: int
    height: int
    input_images: int = 0
    masked: bool = False

    @property
    def edit(self) -> bool:
        return self.input_images > 0


# A masked edit's output keeps its image's ~1024x1024 size, on the CPU too.
INPAINT_CASE = Case("inpaint-1024x1024", 1024, 1024, input_images=1, masked=True)
FULL_CASES = (
    Case("1328x1328", 1328, 1328),
    Case("1664x928", 1664, 928),
    Case("1024x1024", 1024, 1024),
    Case("edit-1024x1024", 1024, 1024, input_images=1),
    Case("edit2-1024x1024", 1024, 1024, input_images=2),
    INPAINT_CASE,
)
SMOKE_CASES = (
    Case("64x64", 64, 64),
    Case("edit-64x64", 64, 64, input_images=1),
    Case("edit2-64x64", 64, 64, input_images=2),
)
SMOKE_NAMED_CASES = (INPAINT_CASE,)  # on the CPU, run when named only: ~1024x1024


@dataclass(frozen=True)
class Mode:
    """How a case is run. Modes run in this order: compilation, the fused LoRA and FP8 stay
    applied once a mode has applied them (as in a deployment; a mode that wants CUDA graphs
    or autotuning after one that did not, or the reverse, compiles the blocks anew); the cache
    is removed again.
    The harness's LoRA has B = 0 (see ``zero_lora``), so it leaves the weights unchanged and
    the exact modes after it still compare with the baseline."""

    name: str
    engine: bool = True  # False: the plain diffusers pipeline call
    cache: bool = False
    compile: bool = False
    graphs: bool = False  # the predictor's --cuda_graphs on (experimental)
    autotune: bool = False  # the predictor's --max_autotune on (experimental)
    lightning: bool = False  # 8 steps, no CFG, Lightning scheduler, a fused LoRA
    fp8: bool = False
    exact: bool = True  # same outputs as the baseline up to bf16 noise
    batching: bool = False  # also measure 8 requests batched against 8 in turn
    previews: int = 0  # partial images per image, as a stream's ``partial_images`` asks


MODES = (
    Mode("baseline", engine=False),
    Mode("engine", batching=True),
    Mode("engine+first_block_cache", cache=True, exact=False),
    Mode("lightning", lightning=True, exact=False, batching=True),
    Mode("engine+compile", compile=True, batching=True),
    Mode("engine+compile+previews", compile=True, previews=3),
    Mode("engine+compile+graphs", compile=True, graphs=True),
    Mode("engine+compile+autotune", compile=True, autotune=True),
    Mode("lightning+compile", compile=True, lightning=True, exact=False),
    Mode("fp8+compile", compile=True, fp8=True, exact=False),
    Mode(
        "lightning+fp8+compile",
        compile=True,
        lightning=True,
        fp8=True,
        exact=False,
        batching=True,
    ),
    Mode(
        "lightning+fp8+compile+graphs",
        compile=True,
        graphs=True,
        lightning=True,
        fp8=True,
        exact=False,
    ),
    Mode(
        "lightning+fp8+compile+autotune",
        compile=True,
        autotune=True,
        lightning=True,
        fp8=True,
        exact=False,
    ),
)


@dataclass
class Row:
    """One measured line of the results table."""

    case: str
    mode: str
    steps: int
    seconds_per_image: float | None = None
    seconds_per_step: float | None = None
    before_loop_seconds: float | None = None  # see StepTimer.around_loop
    after_loop_seconds: float | None = None
    first_run_seconds: float | None = None
    peak_memory_gib: float | None = None
    max_abs_diff: float | None = None
    psnr_db: float | None = None
    note: str = ""
    # Medians over the timed runs, sampled through NVML (CUDA only): a GPU at its power
    # limit lowers its clock, and every kernel slows.
    sm_clock_mhz: float | None = None
    power_w: float | None = None


@dataclass
class Results:
    environment: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    floors: list[dict[str, Any]] = field(default_factory=list)
    attention: list[dict[str, Any]] = field(default_factory=list)
    parts: list[dict[str, Any]] = field(default_factory=list)
    profiles: list[dict[str, Any]] = field(default_factory=list)
    warmups: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def text_encoder_config(tokenizer) -> Qwen2_5_VLConfig:
    """The published config with the special token ids of the offline tokenizer."""
    token_id = tokenizer.convert_tokens_to_ids
    eos = token_id("<|endoftext|>")
    ids = {
        "image_token_id": token_id("<|image_pad|>"),
        "video_token_id": token_id("<|video_pad|>"),
        "vision_start_token_id": token_id("<|vision_start|>"),
        "vision_end_token_id": token_id("<|vision_end|>"),
        "bos_token_id": None,
        "eos_token_id": eos,
        "pad_token_id": eos,
    }
    text = {**TEXT_ENCODER_CONFIG["text_config"], "bos_token_id": None, "eos_token_id": eos}
    return Qwen2_5_VLConfig(**{**TEXT_ENCODER_CONFIG, "text_config": text, **ids})


def tokenizer_texts() -> list[str]:
    """The harness's prompts as the pipelines wrap them in their prompt templates (read from
    pipelines built without components), for the tokenizer to learn their words."""
    empty = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    templates = (
        QwenImagePipeline(**empty).prompt_template_encode,
        QwenImageEditPipeline(processor=None, **empty).prompt_template_encode,
    )
    prompts = (PROMPT, NEGATIVE_PROMPT, EDIT_PROMPT, *BATCH_PROMPTS)
    return [template.format(prompt) for template in templates for prompt in prompts]


def build_full_pipelines(
    device: torch.device, scratch: Path, words_from: Sequence[str]
) -> tuple[QwenImagePipeline, QwenImageEditPipeline]:
    """Full-size pipelines with random bf16 weights, built on the device (one set of weights,
    shared by both pipelines: Qwen-Image-Edit has Qwen-Image's architecture). The tokenizer
    learns the words of ``words_from`` (``tiny.build_tokenizer``)."""
    tokenizer = tiny.build_tokenizer(scratch / "tokenizer", words_from)
    with torch.device(device), default_dtype(torch.bfloat16):
        components = {
            "scheduler": FlowMatchEulerDiscreteScheduler(**tiny.QWEN_IMAGE_SCHEDULER_CONFIG),
            "vae": AutoencoderKLQwenImage(),
            "text_encoder": Qwen2_5_VLForConditionalGeneration(
                text_encoder_config(tokenizer)
            ).eval(),
            "tokenizer": tokenizer,
            "transformer": QwenImageTransformer2DModel(),
        }
    config_dir = scratch / "image_processor"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR_CONFIG))
    processor = tiny.ImageOnlyQwen2VLProcessor(
        image_processor=AutoImageProcessor.from_pretrained(config_dir), tokenizer=tokenizer
    )
    for model in (components["transformer"], components["vae"]):
        model.eval()
    return QwenImagePipeline(**components), QwenImageEditPipeline(processor=processor, **components)


def build_smoke_pipelines(
    scratch: Path, words_from: Sequence[str]
) -> tuple[QwenImagePipeline, QwenImageEditPipeline]:
    """The tiny offline pipelines of ``predictors.tiny`` in float32, sharing their weights."""
    edit = tiny.build_tiny_pipeline("edit", scratch, words_from)
    shared = {name: part for name, part in edit.components.items() if name != "processor"}
    return QwenImagePipeline(**shared), edit


def zero_lora(transformer: torch.nn.Module, path: Path, rank: int = 16) -> Path:
    """A PEFT-format LoRA on every block projection with B = 0 (PEFT's own initialisation):
    it goes through the real load-and-fuse path and leaves the weights as they were, so the
    modes after it still compare with the baseline. Its compute cost after fusing is zero."""
    state = {}
    for name, module in transformer.named_modules():
        if acceleration.is_block_projection(module, name):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(
                rank, module.in_features, dtype=torch.bfloat16
            )
            state[f"transformer.{name}.lora_B.weight"] = torch.zeros(
                module.out_features, rank, dtype=torch.bfloat16
            )
    save_file(state, path)
    return path


class StepTimer:
    """Marks the end of each step without synchronising: CUDA events on a GPU, the clock on
    a CPU. Usable as ``denoise.generate``'s ``on_step_end`` and as a diffusers callback.
    ``start`` and ``stop``, around the whole call, also time the work before the loop and
    after it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []
        self.started: Any = None
        self.stopped: Any = None

    def now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def between(self, first: Any, last: Any) -> float:
        if self.cuda:
            last.synchronize()
            return first.elapsed_time(last) / 1000
        return last - first

    def start(self) -> None:
        self.started = self.now()

    def stop(self) -> None:
        self.stopped = self.now()

    def mark(self, *args: Any) -> dict:
        self.marks.append(self.now())
        return {}

    def seconds_per_step(self) -> float:
        if len(self.marks) < 2:
            return math.nan
        return self.between(self.marks[0], self.marks[-1]) / (len(self.marks) - 1)

    def around_loop(self) -> tuple[float, float]:
        """Seconds before the loop (from ``start`` to the first step's end, less a step:
        encoding, noise, schedule, and what the first step costs more than the others) and
        after it (from the last step's end to ``stop``: decoding, the image to the host)."""
        if not self.marks or self.started is None or self.stopped is None:
            return math.nan, math.nan
        before = self.between(self.started, self.marks[0]) - self.seconds_per_step()
        return before, self.between(self.marks[-1], self.stopped)


def run_baseline(pipeline, job: Job, on_step_end: Callable[..., dict] | None = None) -> np.ndarray:
    """The original service: one plain pipeline call with diffusers' defaults, image i
    seeded with its own generator; ``on_step_end`` is its step-end callback. The engine's
    feed-forward projections, where installed, run as diffusers' for it. A masked job's
    pipeline is a ``QwenImageEditInpaintPipeline``, run at full strength."""
    extra = {}
    if job.images:
        extra["image"] = list(job.images) if takes_several_images(pipeline) else job.images[0]
    if job.mask is not None:
        extra.update(mask_image=job.mask, strength=1.0)
    with feedforward.as_diffusers(pipeline.transformer):
        return pipeline(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            true_cfg_scale=job.true_cfg_scale,
            width=job.width,
            height=job.height,
            num_inference_steps=job.num_inference_steps,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in job.seeds],
            output_type="np",
            callback_on_step_end=on_step_end,
            **extra,
        ).images


def compare(image: np.ndarray, reference: np.ndarray | None) -> tuple[float | None, float | None]:
    """Max abs difference and PSNR (dB) of images in [0, 1]."""
    if reference is None or image.shape != reference.shape:
        return None, None
    diff = np.abs(image.astype(np.float64) - reference.astype(np.float64))
    mse = float((diff**2).mean())
    return float(diff.max()), (math.inf if mse == 0 else 10 * math.log10(1 / mse))


@dataclass
class Measurement:
    """What ``measure`` saw: the timed runs' seconds, and medians over them."""

    seconds: list[float]
    seconds_per_step: float
    first_run_seconds: float
    peak_memory_gib: float | None
    output: np.ndarray
    before_loop_seconds: float
    after_loop_seconds: float
    device_samples: dict[str, float]  # ``DeviceSampler.medians``: empty off CUDA


def measure(
    call: Callable[[StepTimer], np.ndarray],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> Measurement:
    """Run ``call`` ``warmup`` times untimed, then ``repeats`` times timed, sampling the
    GPU's clock and power meanwhile."""
    first = None
    for _ in range(warmup):
        synchronize(device)
        started = time.perf_counter()
        call(StepTimer(device))
        synchronize(device)
        first = first if first is not None else time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, timers, output = [], [], None
    with DeviceSampler(nvml_reader(device)) as sampler:
        for _ in range(repeats):
            timer = StepTimer(device)
            synchronize(device)
            started = time.perf_counter()
            timer.start()
            result = call(timer)
            timer.stop()
            synchronize(device)
            seconds.append(time.perf_counter() - started)
            timers.append(timer)
            output = result if output is None else output
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    around = [timer.around_loop() for timer in timers]
    return Measurement(
        seconds=seconds,
        seconds_per_step=statistics.median(timer.seconds_per_step() for timer in timers),
        first_run_seconds=first if first is not None else seconds[0],
        peak_memory_gib=peak,
        output=output,
        before_loop_seconds=statistics.median(before for before, _ in around),
        after_loop_seconds=statistics.median(after for _, after in around),
        device_samples=sampler.medians(),
    )


def compiled_graphs() -> int:
    """How many graphs ``torch.compile`` has compiled in this process."""
    return counters["stats"]["unique_graphs"]


def cudagraph_counts() -> dict[str, int]:
    """Inductor's CUDA graph counters in this process: graph partitions generated, graphs
    it declined to capture, and inputs copied in at each recording (0: nothing recorded)."""
    names = ("cudagraph_partitions", "cudagraph_skips", "cudagraph_recorded_non_static_inputs")
    return {name: counters["inductor"][name] for name in names}


def transformer_flops(config: Any, image_tokens: int, text_tokens: int) -> float:
    """FLOPs of one transformer forward for one sample (matmuls only: the linear layers of
    both streams, attention's two products, the input/output projections)."""
    dim = config.num_attention_heads * config.attention_head_dim
    tokens = image_tokens + text_tokens
    block = 2 * 12 * dim * dim * tokens + 2 * 2 * tokens * tokens * dim + 2 * 2 * 6 * dim * dim
    embed = 2 * (
        config.in_channels * dim * image_tokens
        + config.joint_attention_dim * dim * text_tokens
        + dim * config.patch_size**2 * config.out_channels * image_tokens
    )
    return config.num_layers * block + embed


def matmul_tflops(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int) -> float:
    """The measured rate (TFLOP/s) of an ``m x k @ k x n`` matrix product."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    repeats = 20 if device.type == "cuda" else 3
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * m * k * n * repeats / (time.perf_counter() - started) / 1e12


def text_lengths(pipeline, job: Job) -> tuple[int, int]:
    """Tokens of the prompt and negative prompt as the transformer sees them."""
    with torch.inference_mode():  # with autograd, the text encoder's activations would stay
        conditioning = condition(
            pipeline, job, pipeline._execution_device, pipeline.text_encoder.dtype
        )
    negative = conditioning.negative_text
    return conditioning.text.shape[0], (0 if negative is None else negative.shape[0])


def modulation_table(transformer: torch.nn.Module, job: Job) -> None:
    """What the engine's loop computes once a request before its first step: every block's
    modulation over all ``job``'s steps (``predictors.modulation.precomputed``)."""
    timesteps = torch.linspace(1, 0, job.num_inference_steps, device=transformer.device)
    with modulation.precomputed(transformer, timesteps.to(transformer.dtype)):
        pass


def step_floor(pipeline, job: Job, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The compute floor of one CFG step: FLOPs / the matmul rate at the step's GEMM shape."""
    config = pipeline.transformer.config
    factor = pipeline.vae_scale_factor * 2
    image_tokens = (job.width // factor) * (job.height // factor)
    for condition_width, condition_height in job.condition_sizes:
        image_tokens += (condition_width // factor) * (condition_height // factor)
    text, negative = text_lengths(pipeline, job)
    flops = transformer_flops(config, image_tokens, text) + transformer_flops(
        config, image_tokens, negative
    )
    dim = config.num_attention_heads * config.attention_head_dim
    rows = 2 * (image_tokens + text)
    rate = matmul_tflops(device, dtype, rows, dim, 4 * dim)
    return {
        "image_tokens": image_tokens,
        "text_tokens": [text, negative],
        "tflops_per_step": flops / 1e12,
        "matmul_tflops": rate,
        "matmul_shape": [rows, dim, 4 * dim],
        "floor_seconds_per_step": flops / 1e12 / rate,
    }


def attention_sweep(
    device: torch.device, dtype: torch.dtype, tokens: int, text: int, heads: int, head_dim: int
) -> list[dict[str, Any]]:
    """Time each backend on a CFG pair's joint attention whose second text is shorter: without
    padding handling (``none``, the cost of equal lengths), with diffusers' padding mask
    (``mask``), and as ``predictors.attention`` runs it, one call per text length (``split``)."""
    shape = (2, tokens, heads, head_dim)
    query, key, value = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    text_lengths = torch.tensor([text, text // 2])  # the negative prompt is the shorter
    mask = torch.ones(2, tokens, dtype=torch.bool, device=device)
    mask[1, text // 2 : text] = False

    def attend(padding_kind: str) -> None:
        if padding_kind == "split":
            padding_free.padded_joint_attention(query, key, value, text_lengths, tokens - text)
        else:
            attn_mask = mask[:, None, None, :] if padding_kind == "mask" else None
            dispatch_attention_fn(query, key, value, attn_mask=attn_mask)

    results = []
    for name in acceleration.MASK_FREE_BACKENDS:
        for padding_kind in ("none", "mask", "split"):
            if padding_kind == "mask" and name not in acceleration.MASK_CAPABLE_BACKENDS:
                continue
            entry = {"backend": name, "padding": padding_kind}
            try:
                with attention_backend(name):
                    attend(padding_kind)
                    synchronize(device)
                    started = time.perf_counter()
                    repeats = 10 if device.type == "cuda" else 2
                    for _ in range(repeats):
                        attend(padding_kind)
                    synchronize(device)
                entry["ms"] = (time.perf_counter() - started) / repeats * 1000
            except Exception as exc:  # report and go on: backends are optional
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            results.append(entry)
    return results


# Substrings of kernel (GPU) or operator (CPU) names, checked in this order. Inductor's fused
# kernels (``triton_poi_*``, ``triton_red_*``) are named after the ops around them, attention
# and matmuls included, so they count as other work; its matmul templates (``triton_tem_*``)
# as matmuls.
KERNEL_KINDS = (
    ("matmul", ("triton_tem",)),
    ("other", ("triton_",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "fprop")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "matmul", "aten::mm", "aten::addmm", "_mm")),
)


def kernel_kind(name: str) -> str:
    """``attention``, ``matmul`` or ``other``, from a kernel's or operator's name."""
    lowered = name.lower()
    for kind, markers in KERNEL_KINDS:
        if any(marker in lowered for marker in markers):
            return kind
    return "other"


def profile_step(
    call: Callable[[Callable[..., dict]], Any], device: torch.device, top: int = 12
) -> dict[str, Any]:
    """Device time of the third denoising step of ``call(on_step_end)``, by kind of kernel
    (on a CPU: operators' own time). Synchronises at each step end, so run it untimed."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=1, warmup=1, active=1, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule) as profiler:

        def on_step_end(*args: Any) -> dict:
            synchronize(device)
            profiler.step()
            return {}

        call(on_step_end)
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for event in profiler.events():
        if event.name.startswith("ProfilerStep"):
            continue  # the step's own annotation (on the device too)
        if device.type == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            microseconds = event.time_range.elapsed_us()
        else:
            microseconds = event.self_cpu_time_total
        by_kind[kernel_kind(event.name)] += microseconds / 1000
        by_name[event.name] += microseconds / 1000
    total = sum(by_kind.values())
    heaviest = sorted(by_name.items(), key=lambda item: -item[1])[:top]
    return {
        "total_ms": total,
        **{f"{kind}_ms": by_kind.get(kind, 0.0) for kind in ("matmul", "attention", "other")},
        "heaviest": [{"name": name[:100], "ms": ms} for name, ms in heaviest],
    }


class Bench:
    """Runs the selected cases through the selected modes, in order."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
        self.args = args
        self.device = device
        self.dtype = dtype
        self._scratch = tempfile.TemporaryDirectory(prefix="qwen-bench-")
        self.scratch = Path(self._scratch.name)  # the tokenizer, image processor and LoRA
        self.started = time.perf_counter()
        words = tokenizer_texts() if args.tokenizer == "words" else ()
        if args.smoke:
            self.generation, self.edit = build_smoke_pipelines(self.scratch, words)
        else:
            self.generation, self.edit = build_full_pipelines(device, self.scratch, words)
        # Qwen-Image-Edit-2509's pipeline, for edits from several images: the same modules.
        self.edit_plus = QwenImageEditPlusPipeline(**self.edit.components)
        # The baseline of masked edits (the engine runs them with the edit pipeline).
        self.inpaint = QwenImageEditInpaintPipeline(**self.edit.components)
        for pipeline in (self.generation, self.edit, self.edit_plus, self.inpaint):
            pipeline.to(device)
            pipeline.set_progress_bar_config(disable=True)
        # The engine's exact modules, as in a deployment (the transformer is the edit
        # pipeline's too). The baseline's calls pass no text lengths, run the feed-forwards as
        # diffusers does (run_baseline) and compute the modulation at each step (only the
        # engine's loop precomputes it).
        acceleration.install_exact_modules(self.generation.transformer, args.text_padding)
        synchronize(device)
        self.build_seconds = time.perf_counter() - self.started
        self.schedulers = {"qwen": self.generation.scheduler}
        self.applied: set[str] = set()  # "lightning", "fp8": applied for good
        # (CUDA graphs, autotuning) the blocks were compiled with; None: not compiled
        self.compiled_as: tuple[bool, bool] | None = None
        self.step_marker: RemovableHandle | None = None  # the +graphs modes' hook
        self.lightning_later = False
        self.floor_done: set[str] = set()  # cases whose floor and attention sweep ran
        self.batching_done: set[str] = set()  # modes whose batching case ran
        # s/image of pipe(...) per request in turn, by the batch's size, steps and CFG
        self.original_service: dict[Hashable, float] = {}
        self.parts_done: set[tuple] = set()  # (size, edit, CFG) whose parts were timed
        self.attention = AttentionBackends(
            masked=args.masked_attention_backend, unmasked=args.attention_backend
        )
        self.baselines: dict[str, np.ndarray] = {}
        self.results = Results(environment=environment(device, self.build_seconds))

    def close(self) -> None:
        """Remove the scratch directory."""
        self._scratch.cleanup()

    def pipeline(self, case: Case):
        return self.pipeline_for(case.input_images)

    def pipeline_for(self, input_images: int):
        """The pipeline of a job with that many input images."""
        if input_images > 1:
            return self.edit_plus
        return self.edit if input_images else self.generation

    def job(self, case: Case, mode: Mode) -> Job:
        rng = np.random.default_rng(0)
        images = tuple(
            Image.fromarray(rng.integers(0, 255, (case.height, case.width, 3)).astype(np.uint8))
            for _ in range(case.input_images)
        )
        steps, cfg = self.args.steps, TRUE_CFG_SCALE
        if mode.lightning:
            steps, cfg = LIGHTNING.num_inference_steps, LIGHTNING.true_cfg_scale
        mask = None
        if case.masked:
            mask = Image.new("L", (case.width, case.height), 0)
            mask.paste(255, (0, 0, case.width // 2, case.height))
        return Job(
            prompt=EDIT_PROMPT if case.edit else PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            seeds=(SEED,),
            width=case.width,
            height=case.height,
            num_inference_steps=steps,
            true_cfg_scale=cfg,
            images=images,
            mask=mask,
            partial_images=mode.previews,
            # The predictor encodes previews off the worker thread; here they are dropped.
            on_partial=(lambda number, index, image: None) if mode.previews else None,
        )

    def skip_reason(self, mode: Mode) -> str | None:
        """Why this machine cannot run ``mode`` (the predictor's own refusal), or None."""
        if mode.fp8:
            try:
                acceleration.check_fp8(self.device)
            except acceleration.AccelerationError as exc:
                return f"skipped: {exc}"
        return None

    def prepare(self, mode: Mode) -> None:
        """Bring the shared transformer and schedulers into ``mode``'s state."""
        transformer = self.generation.transformer
        if mode.compile and self.compiled_as != (mode.graphs, mode.autotune):
            self.compile(mode.graphs, mode.autotune)
        # The LoRA is fused before FP8 takes the weights, as in a deployment.
        lightning = mode.lightning or (mode.fp8 and self.lightning_later)
        if lightning and "lightning" not in self.applied:
            lora = zero_lora(transformer, self.scratch / "zero_lora.safetensors")
            acceleration.apply(self.generation, Acceleration(compile="off", lora=str(lora)))
            self.schedulers["lightning"] = self.generation.scheduler
            self.applied.add("lightning")
        if mode.fp8 and "fp8" not in self.applied:
            acceleration.quantize_fp8(transformer)
            self.applied.add("fp8")
        if mode.cache:
            acceleration.apply(self.generation, Acceleration(compile="off", cache="first_block"))
        scheduler = self.schedulers["lightning" if mode.lightning else "qwen"]
        for pipeline in (self.generation, self.edit, self.edit_plus, self.inpaint):
            pipeline.scheduler = scheduler

    def compile(self, cuda_graphs: bool, max_autotune: bool) -> None:
        """Compile the blocks as the predictor does, with or without CUDA graphs and
        autotuning (``acceleration.compile_blocks``). Compiling anew starts dynamo afresh."""
        if self.compiled_as is not None:
            torch._dynamo.reset()
        if self.step_marker is not None:
            self.step_marker.remove()
        self.step_marker = acceleration.compile_blocks(
            self.generation.transformer, cuda_graphs=cuda_graphs, max_autotune=max_autotune
        )
        self.compiled_as = (cuda_graphs, max_autotune)

    def settings(self, mode: Mode) -> Acceleration:
        """The predictor's settings for how ``mode`` runs the engine: attention, text padding,
        compilation, autotuning, FP8 and CUDA graphs (with FP8 or CUDA graphs, texts are
        padded to buckets)."""
        return Acceleration(
            attention=self.attention,
            text_padding=self.args.text_padding,
            compile="on" if mode.compile else "off",
            quantization="fp8" if mode.fp8 else "none",
            cuda_graphs="on" if mode.graphs else "off",
            max_autotune="on" if mode.autotune else "off",
        )

    def run(self, plan: list[tuple[list[Case], list[Mode]]]) -> Results:
        """Run each (cases, modes) group of ``plan`` in turn, on the same pipelines."""
        self.lightning_later = any(mode.lightning for _, modes in plan for mode in modes)
        for cases, modes in plan:
            self.run_group(cases, modes)
        return self.results

    def run_group(self, cases: list[Case], modes: list[Mode]) -> None:
        for mode in modes:
            if reason := self.skip_reason(mode):
                for case in cases:
                    self.results.rows.append(Row(case.name, mode.name, 0, note=reason))
                    print_row(self.results.rows[-1])
                continue
            try:
                self.progress(f"{mode.name}: preparing")
                self.prepare(mode)
                for case in cases:
                    cuda_graphs = cudagraph_counts()
                    if mode.compile:
                        self.progress(f"{mode.name}: warming up at {case.name}")
                    warmup = self.warm_up(case, mode) if mode.compile else None
                    graphs = compiled_graphs()
                    self.progress(f"{mode.name}: timing {case.name}")
                    self.results.rows.append(self.run_case(case, mode))
                    if warmup is not None:
                        warmup["graphs_after_warmup"] = compiled_graphs() - graphs
                        if mode.graphs:  # did CUDA graphs engage, and what costs a new shape?
                            for name, count in cudagraph_counts().items():
                                warmup[name] = count - cuda_graphs[name]
                            warmup.update(self.new_shape_cost(case, mode))
                        self.results.warmups.append(warmup)
                        print(f"warmup {json.dumps(warmup)}", flush=True)
                    if self.args.profile:
                        self.profile(case, mode)
                    if case.name not in self.floor_done:
                        self.results.floors.append(self.floor(case))
                        self.floor_done.add(case.name)
                if mode.batching and mode.name not in self.batching_done:
                    for size in self.args.batch_sizes:
                        self.results.rows.append(self.run_batching(size, mode))
                    self.batching_done.add(mode.name)
            except Exception as exc:  # one GPU call runs many modes: report and go on
                first_line = (str(exc).splitlines() or [""])[0]
                note = f"failed: {type(exc).__name__}: {first_line[:160]}"
                self.results.rows.append(Row("-", mode.name, 0, note=note))
                print_row(self.results.rows[-1])  # before the traceback: a cut log keeps it
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                if mode.cache:
                    self.generation.transformer.disable_cache()
                self.save()  # so a run stopped at its time limit keeps what it measured

    def progress(self, stage: str) -> None:
        """Print the seconds since the harness started and what it starts now: a run stopped
        at its time limit shows where its time went."""
        print(f"progress {time.perf_counter() - self.started:.1f} s: {stage}", flush=True)

    def save(self) -> None:
        """Write the results so far to ``--json``, if given."""
        if self.args.json:
            self.args.json.write_text(json.dumps(asdict(self.results), indent=2, default=str))

    def call(self, case: Case, mode: Mode, job: Job, on_step_end: Callable[..., dict]):
        """One image of ``case`` as ``mode`` makes it; ``on_step_end`` marks each step."""
        pipeline = self.pipeline(case)
        if mode.engine:
            return generate(
                pipeline,
                [job],
                attention=self.attention,
                output_type="np",
                on_step_end=on_step_end,
                text_bucket=self.settings(mode).text_bucket,
            )[0]
        return run_baseline(self.inpaint if case.masked else pipeline, job, on_step_end)

    def warmup_batches(self, case: Case, mode: Mode) -> list[list[Job]]:
        """The predictor's load-time warm-up batches at the case's size, with ``mode``'s
        negative prompt and CFG; with ``--compile-warmup case``, the case's request alone."""
        job = self.job(case, mode)
        if self.args.compile_warmup == "case":
            return [[job]]
        return acceleration.warmup_batches(
            [(case.width, case.height)], job.negative_prompt, job.true_cfg_scale, case.edit
        )

    def warm_up(self, case: Case, mode: Mode) -> dict[str, Any]:
        """The predictor's load-time warm-up at the case's size, as ``mode`` runs it."""
        batches = self.warmup_batches(case, mode)
        graphs = compiled_graphs()
        seconds = acceleration.warm_up(self.pipeline(case), batches, self.settings(mode))
        return {
            "case": case.name,
            "mode": mode.name,
            "warmup": self.args.compile_warmup,
            "warmup_seconds": seconds,
            "graphs_in_warmup": compiled_graphs() - graphs,
        }

    def new_shape_cost(self, case: Case, mode: Mode) -> dict[str, Any]:
        """With CUDA graphs: one request whose texts pad to a length that neither the warm-up
        nor the case had (its prompt repeated), timed at its first call, which records the
        new shape in its first two steps, and at its second, which replays it. Only after the
        predictor's warm-up: after the case's alone, a new length would compile anew."""
        if self.args.compile_warmup == "case":
            return {"new_shape": "not measured: --compile-warmup case compiled one shape"}
        pipeline, job = self.pipeline(case), self.job(case, mode)
        bucket = self.settings(mode).text_bucket

        def padded(jobs: Sequence[Job]) -> int:
            longest = max(max(text_lengths(pipeline, each)) for each in jobs)
            return padded_text_length(longest, bucket)

        seen = {padded(batch) for batch in self.warmup_batches(case, mode)} | {padded([job])}
        for repeats in range(2, 13):
            new = replace(job, prompt=" ".join([job.prompt] * repeats))
            if (length := padded([new])) not in seen:
                break
        else:
            return {"new_shape": "none found"}
        graphs = compiled_graphs()
        seconds = []
        for _ in range(2):
            synchronize(self.device)
            started = time.perf_counter()
            self.call(case, mode, new, lambda *_: {})
            synchronize(self.device)
            seconds.append(time.perf_counter() - started)
        return {
            "new_shape_text_tokens": length,
            "new_shape_first_call_s": seconds[0],
            "new_shape_second_call_s": seconds[1],
            "graphs_in_new_shape": compiled_graphs() - graphs,
        }

    def run_case(self, case: Case, mode: Mode) -> Row:
        job = self.job(case, mode)

        def call(timer: StepTimer) -> np.ndarray:
            return self.call(case, mode, job, timer.mark)

        # Compiled modes compiled the case's shapes in the warm-up before (``warm_up``).
        measured = measure(call, self.device, self.args.warmup, self.args.repeats)
        if not mode.engine:
            self.baselines[case.name] = measured.output
        diff, psnr = compare(measured.output, self.baselines.get(case.name))
        row = Row(
            case=case.name,
            mode=mode.name,
            steps=job.num_inference_steps,
            seconds_per_image=statistics.median(measured.seconds) / job.num_images,
            seconds_per_step=measured.seconds_per_step,
            before_loop_seconds=measured.before_loop_seconds,
            after_loop_seconds=measured.after_loop_seconds,
            first_run_seconds=measured.first_run_seconds,
            peak_memory_gib=measured.peak_memory_gib,
            max_abs_diff=diff,
            psnr_db=psnr,
            note="" if mode.exact else "outputs change by design",
            sm_clock_mhz=measured.device_samples.get("sm_clock_mhz"),
            power_w=measured.device_samples.get("power_w"),
        )
        print_row(row)
        if measured.device_samples:
            entry = {"case": case.name, "mode": mode.name, **measured.device_samples}
            print(f"clocks {json.dumps(entry)}", flush=True)
        return row

    def profile(self, case: Case, mode: Mode) -> None:
        """Where a step's device time goes in ``mode`` (three steps, the third profiled), and
        the work around the loop."""
        self.time_parts(case.name, self.job(case, mode))
        job = replace(self.job(case, mode), num_inference_steps=3)
        entry = {
            "case": case.name,
            "mode": mode.name,
            **profile_step(lambda mark: self.call(case, mode, job, mark), self.device),
        }
        self.results.profiles.append(entry)
        print(f"profile {json.dumps(entry)}", flush=True)

    def time_parts(self, name: str, job: Job) -> None:
        """Seconds of the per-image work around the loop: encoding a request's prompts (and
        edit image), computing the blocks' modulation for all its steps (where installed), and
        decoding one image (to an array, as the engine does). Also the VAE
        alone at the job's size, diffusers' against ``predictors.vae``'s 2D convolutions
        (``bench/vae_single_frame.py``'s comparison). Once per size, kind and CFG: the
        transformer's modes do not change them."""
        key = (job.width, job.height, len(job.images), job.do_true_cfg)
        if key in self.parts_done:
            return
        self.parts_done.add(key)
        pipeline = self.pipeline_for(len(job.images))
        factor = pipeline.vae_scale_factor * 2
        tokens = (job.width // factor) * (job.height // factor)
        channels = pipeline.transformer.config.in_channels
        latents = torch.randn(1, tokens, channels, device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            entry = {
                "case": name if job.do_true_cfg else f"{name}, no CFG",
                "encode_request_s": median_seconds(
                    lambda: condition(pipeline, job, self.device, self.dtype), self.device
                ),
                "decode_image_s": median_seconds(
                    lambda: decode(pipeline, latents, job, "np"), self.device
                ),
                **(
                    {
                        "modulation_table_s": median_seconds(
                            lambda: modulation_table(pipeline.transformer, job), self.device
                        )
                    }
                    if modulation.installed(pipeline.transformer)
                    else {}
                ),
                **{
                    f"vae_{field_name}": value
                    for field_name, value in compare_vae_paths(
                        pipeline.vae, job.width, job.height, repeats=1
                    ).items()
                },
            }
        self.results.parts.append(entry)
        print(f"parts {json.dumps(entry)}", flush=True)

    def floor(self, case: Case) -> dict[str, Any]:
        job = self.job(case, MODES[1])
        result = {
            "case": case.name,
            **step_floor(self.pipeline(case), job, self.device, self.dtype),
        }
        print(f"floor {case.name}: {json.dumps(result)}", flush=True)
        config = self.generation.transformer.config
        tokens = result["image_tokens"] + result["text_tokens"][0]
        for entry in attention_sweep(
            self.device,
            self.dtype,
            tokens,
            result["text_tokens"][0],
            config.num_attention_heads,
            config.attention_head_dim,
        ):
            entry = {"case": case.name, **entry}
            self.results.attention.append(entry)
            print(f"attention {json.dumps(entry)}", flush=True)
        return result

    def run_batching(self, size: int, mode: Mode) -> Row:
        """Eight requests of different prompts, with ``mode``'s steps and CFG: in turn, then
        as one batch. Besides the totals, the step time of the first request alone and of
        the batch, which tell the denoising loop's share from the per-image work around it
        (encoding, decoding). Once per size, steps and CFG, while the pipeline is still plain:
        the original service's sequential serving, a plain pipeline call per request in
        turn."""
        like = self.job(Case(f"{size}x{size}", size, size), mode)
        jobs = [
            replace(like, prompt=prompt, seeds=(SEED + index,))
            for index, prompt in enumerate(BATCH_PROMPTS)
        ]

        def in_turn(timer: StepTimer) -> np.ndarray:
            outputs = [
                generate(
                    self.generation,
                    [job],
                    attention=self.attention,
                    output_type="np",
                    on_step_end=timer.mark if index == 0 else None,
                )[0]
                for index, job in enumerate(jobs)
            ]
            return np.concatenate(outputs)

        def batched(timer: StepTimer) -> np.ndarray:
            outputs = generate(
                self.generation,
                jobs,
                attention=self.attention,
                output_type="np",
                on_step_end=timer.mark,
            )
            return np.concatenate(outputs)

        def original_service(timer: StepTimer) -> np.ndarray:
            outputs = [
                run_baseline(self.generation, job, timer.mark if index == 0 else None)
                for index, job in enumerate(jobs)
            ]
            return np.concatenate(outputs)

        plain = not self.applied and self.compiled_as is None
        if like.batch_key not in self.original_service and plain:
            original = measure(original_service, self.device, self.args.warmup, 1)
            self.original_service[like.batch_key] = original.seconds[0] / len(jobs)
        warmup = max(self.args.warmup, 1 if mode.compile else 0)
        turn = measure(in_turn, self.device, warmup, 1)
        batch = measure(batched, self.device, warmup, 1)
        diff, psnr = compare(batch.output, turn.output)
        self.time_parts(f"batch{len(jobs)}-{size}x{size}", jobs[0])
        count, steps = len(jobs), like.num_inference_steps
        turn_image, batch_image = turn.seconds[0] / count, batch.seconds[0] / count
        alone_step, batch_step = turn.seconds_per_step, batch.seconds_per_step
        original = self.original_service.get(like.batch_key)
        original_note = (
            "original service not measured (the pipeline was no longer plain)"
            if original is None
            else f"original service in turn {original:.3f} s/image, batched "
            f"{original / batch_image:.2f}x that"
        )
        row = Row(
            case=f"batch8-{size}x{size}",
            mode=mode.name,
            steps=steps,
            seconds_per_image=batch_image,
            seconds_per_step=batch_step,
            peak_memory_gib=batch.peak_memory_gib,
            max_abs_diff=diff,
            psnr_db=psnr,
            note=(
                f"in turn {turn_image:.3f} s/image; batched {turn_image / batch_image:.2f}x; "
                f"step alone {alone_step:.4f} s, batch of {count} {batch_step:.4f} s; "
                f"outside the loop per image: in turn {turn_image - steps * alone_step:.3f} s, "
                f"batched {batch_image - steps * batch_step / count:.3f} s; {original_note}"
            ),
        )
        print_row(row)
        return row


def environment(device: torch.device, build_seconds: float) -> dict[str, Any]:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "build_seconds": round(build_seconds, 1),
    }
    try:
        info["torchao"] = importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        info["torchao"] = None
    if device.type == "cuda":
        info["driver"] = nvidia_driver_version()
        info["weights_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 1)
        info["gpu_total_gib"] = round(
            torch.cuda.get_device_properties(device).total_memory / 2**30, 1
        )
    print(f"environment {json.dumps(info)}", flush=True)
    return info


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver's version, from ``nvidia-smi`` where the machine has it."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    completed = subprocess.run(query, capture_output=True, text=True, timeout=30)
    return completed.stdout.strip().splitlines()[0] if completed.returncode == 0 else None


def print_row(row: Row) -> None:
    def fmt(value: float | None, digits: int = 3) -> str:
        return (
            "-"
            if value is None or (isinstance(value, float) and math.isnan(value))
            else (f"{value:.{digits}f}")
        )

    print(
        f"| {row.case} | {row.mode} | {row.steps} | {fmt(row.seconds_per_image)} | "
        f"{fmt(row.seconds_per_step, 4)} | {fmt(row.before_loop_seconds)} | "
        f"{fmt(row.after_loop_seconds)} | {fmt(row.first_run_seconds, 1)} | "
        f"{fmt(row.peak_memory_gib, 1)} | {fmt(row.max_abs_diff, 5)} | {fmt(row.psnr_db, 1)} | "
        f"{row.note} |",
        flush=True,
    )


def select(names: str | None, known: tuple, kind: str, default: tuple | None = None) -> list:
    """The items of ``known`` that ``names`` lists; ``default`` (or all) when none."""
    if not names:
        return list(known if default is None else default)
    if names == "none":
        return []
    by_name = {item.name: item for item in known}
    unknown = [name for name in names.split(",") if name not in by_name]
    if unknown:
        raise SystemExit(f"unknown {kind}: {', '.join(unknown)}; known: {', '.join(by_name)}")
    wanted = set(names.split(","))
    return [item for item in known if item.name in wanted]  # canonical order


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny pipelines on the CPU")
    parser.add_argument("--cases", help="comma-separated case names, or none (default: all)")
    parser.add_argument("--modes", help="comma-separated mode names (default: all)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case and mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument(
        "--batch-sizes",
        default="512,1024",
        help="square sizes of the 8-request batching case, or none",
    )
    parser.add_argument("--attention-backend", default="native")
    parser.add_argument("--masked-attention-backend", default="native")
    parser.add_argument(
        "--text-padding",
        choices=acceleration.TEXT_PADDINGS,
        default="split",
        help="how the engine skips text padding (the predictor's --text_padding)",
    )
    parser.add_argument(
        "--runs",
        action="append",
        metavar="CASES=MODES",
        help="a group of cases and the modes to run them in, e.g. "
        "'1328x1328=baseline,engine'; repeat it to run several groups on one build of the "
        "pipelines (replaces --cases and --modes)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after each case and mode, profile one step: device time by kind of kernel",
    )
    parser.add_argument(
        "--tokenizer",
        choices=("words", "bytes"),
        default="words",
        help="'words': the tokenizer knows the prompts' words, so texts are about as long as "
        "Qwen's tokenizer makes them; 'bytes': a token per byte, as in runs 1 to 6",
    )
    parser.add_argument(
        "--compile-warmup",
        choices=("predictor", "case"),
        default="predictor",
        help="what compiled modes run before a case: 'predictor', the predictor's load-time "
        "warm-up (its batch sizes and text lengths: what a deployment pays at start); 'case', "
        "the case's request alone (one compile: for a run short of time)",
    )
    parser.add_argument(
        "--json", type=Path, help="write the results here (after each mode, and at the end)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.repeats, args.warmup = 2, 1, 0
        args.batch_sizes = "64,128" if args.batch_sizes == "512,1024" else args.batch_sizes
    args.batch_sizes = (
        [] if args.batch_sizes == "none" else [int(size) for size in args.batch_sizes.split(",")]
    )
    return args


def plan_runs(args: argparse.Namespace) -> list[tuple[list[Case], list[Mode]]]:
    """The cases and modes of each ``--runs`` group (or of ``--cases`` and ``--modes``);
    ``SystemExit`` for a name the harness does not know."""
    default_cases = SMOKE_CASES if args.smoke else FULL_CASES
    known_cases = SMOKE_CASES + SMOKE_NAMED_CASES if args.smoke else FULL_CASES
    groups = [run.split("=", 1) for run in args.runs or []] or [(args.cases, args.modes)]
    return [
        (select(cases, known_cases, "cases", default_cases), select(modes, MODES, "modes"))
        for cases, modes in groups
    ]


def main(argv: list[str] | None = None) -> Results:
    args = parse_args(argv)
    plan = plan_runs(args)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: run with --smoke to check the harness on a CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
    bench = Bench(args, device, dtype)
    print(
        "| case | mode | steps | s/image | s/step | before loop s | after loop s | first run s "
        "| peak GiB | max abs diff | PSNR dB | note |\n" + "|---" * 12 + "|",
        flush=True,
    )
    try:
        results = bench.run(plan)
        bench.save()
    finally:
        bench.close()
    return results


if __name__ == "__main__":
    main()
