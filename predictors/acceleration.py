"""Load-time speed modes of a predictor, each chosen per deployment (flags in ``server.py``).

- attention backends for masked and mask-free batches, and padding-free attention for texts
  of different lengths (exact);
- the feed-forwards' GELU in the product's epilogue on CUDA (exact to bf16 rounding);
- the blocks' modulation computed for all of a request's steps at once (exact to rounding);
- regional compilation of the transformer blocks, warmed up at load time (exact to bf16 noise),
  optionally replayed as CUDA graphs (an experiment: no gain on an H100, with CFG or Lightning)
  or autotuned (an experiment: no gain on an H100 at 1328x1328, a compile 3x as long);
- a step-distilled LoRA such as Qwen-Image-Lightning, fused into the weights, with its
  scheduler settings (fast mode: changes the outputs, meant for 8 steps without CFG);
- FP8 weights and activations through torchao (fast mode: changes the outputs slightly);
- a step cache through diffusers' hooks (fast mode: skips work when steps change little).

It imports no kserve, so the benchmark harness applies the same modes on a bare GPU host.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.hooks import FirstBlockCacheConfig
from diffusers.models.attention_dispatch import attention_backend
from PIL import Image
from torch.utils.hooks import RemovableHandle

from predictors import attention as padding_free
from predictors import feedforward, modulation
from predictors.contract import SIZE_MULTIPLE
from predictors.denoise import AttentionBackends, Job, generate

logger = logging.getLogger(__name__)

# diffusers attention backends that take the padding mask of Qwen's joint [text, image]
# sequence. `flash`, `_flash_3`, `_native_flash` and `sage` refuse masks; the varlen backends
# mis-pack Qwen's layout (diffusers #14139), so neither kind is offered for masked batches.
MASK_CAPABLE_BACKENDS = ("native", "_native_cudnn", "_native_efficient", "_native_math", "xformers")
MASK_FREE_BACKENDS = (*MASK_CAPABLE_BACKENDS, "_native_flash", "flash", "_flash_3", "sage")

# How batches whose texts differ in length skip the padding: `split` attends each run of
# equal text lengths on its own with the mask-free backend (predictors.attention); `mask`
# hands diffusers' padding mask to the masked backend (slower: no flash kernel takes it).
TEXT_PADDINGS = ("split", "mask")
QUANTIZATIONS = ("none", "fp8")
# Step caches that worked with Qwen-Image's true CFG (PyramidAttentionBroadcast and
# FasterCache do not); the value builds diffusers' config from the threshold.
CACHES = {"none": None, "first_block": lambda threshold: FirstBlockCacheConfig(threshold=threshold)}
COMPILE_CHOICES = ("auto", "on", "off")
SWITCH_CHOICES = ("off", "on")  # --cuda_graphs and --max_autotune
# Inductor's options for --max_autotune on: torch.compile's "max-autotune-no-cudagraphs" mode
# (CUDA graphs are --cuda_graphs's). Each matrix product is timed as cuBLAS and as Triton's
# templates, which can take the elementwise work after it, and the fastest is kept; the other
# kernels' launch settings are tuned by coordinate descent.
MAX_AUTOTUNE_OPTIONS = {"max_autotune": True, "coordinate_descent_tuning": True}
# With CUDA graphs or FP8, a batch's texts are zero-padded to a multiple of this many tokens
# (padding is exact with split attention, which attends each text's real tokens only).
# - CUDA graphs record each shape the compiled blocks see once, so buckets keep the
#   recordings few: 8 text lengths up to Qwen-Image's 512 tokens, where exact lengths would
#   record one per length.
# - FP8: on an H100 (torch 2.11, CUDA 13), cuBLASLt has no kernel for the MLP's down
#   projection (12288 -> 3072, with bias) at fewer than 48 rows (CUBLAS_STATUS_NOT_SUPPORTED),
#   and a text stream's rows are its batch times its tokens: a short prompt failed (run 8).
TEXT_BUCKET = 64
# The fewest rows (batch times tokens) FP8's MLP down projection ran at on an H100 in run 8:
# 48 ran, 41 and fewer did not. Texts pad to TEXT_BUCKET; images must have as many tokens.
FP8_MIN_ROWS = 48


@dataclass(frozen=True)
class StepDistillation:
    """How a step-distilled LoRA is run: its scheduler settings and request defaults."""

    scheduler: dict[str, Any]
    num_inference_steps: int
    true_cfg_scale: float


# Qwen-Image-Lightning: a constant shift of 3 (base_shift = max_shift = ln 3), no terminal
# stretch, 8 steps (4 for its 4-step variant) and no CFG.
LIGHTNING = StepDistillation(
    scheduler={"base_shift": math.log(3), "max_shift": math.log(3), "shift_terminal": None},
    num_inference_steps=8,
    true_cfg_scale=1.0,
)


class AccelerationError(RuntimeError):
    """A speed mode cannot be applied here; the message says why and what to do."""


def _first_line(exc: BaseException) -> str:
    """The first line of an error's message (Inductor's run to pages)."""
    return next(iter(str(exc).splitlines()), "")


@dataclass(frozen=True)
class Acceleration:
    """The speed modes of one deployment. The defaults change nothing but the loop, how
    attention skips text padding, where GELU runs and when the modulation is computed, all
    exact (GELU and the modulation to rounding)."""

    attention: AttentionBackends = field(default_factory=AttentionBackends)
    text_padding: str = "split"
    # auto: on for CUDA where Triton can build (1.29x at 1328x1328 and 1.19x for edit on an
    # H100, exact to bf16 noise, docs/performance.md), at the cost of compiling at start.
    compile: str = "auto"
    # Replay each compiled block's kernels as CUDA graphs (Inductor's CUDA graph trees):
    # fewer kernel launches per step. No gain yet on an H100 (docs/performance.md).
    cuda_graphs: str = "off"
    # Autotune the compiled blocks' kernels at load (MAX_AUTOTUNE_OPTIONS): compiling takes
    # longer. Not measured on a GPU yet (docs/performance.md).
    max_autotune: str = "off"
    warmup_sizes: tuple[tuple[int, int], ...] | None = None  # None: the predictor's default
    quantization: str = "none"
    cache: str = "none"
    cache_threshold: float = 0.05
    lora: str | None = None
    lora_weight_name: str | None = None
    lora_steps: int = LIGHTNING.num_inference_steps

    def __post_init__(self) -> None:
        for name, value, known in (
            ("compile", self.compile, COMPILE_CHOICES),
            ("cuda_graphs", self.cuda_graphs, SWITCH_CHOICES),
            ("max_autotune", self.max_autotune, SWITCH_CHOICES),
            ("text_padding", self.text_padding, TEXT_PADDINGS),
            ("quantization", self.quantization, QUANTIZATIONS),
            ("cache", self.cache, tuple(CACHES)),
        ):
            if value not in known:
                raise ValueError(f"{name} must be one of {', '.join(known)}, not {value!r}")

    def compiles(self, device: torch.device) -> bool:
        """Whether the transformer blocks are compiled on ``device``: ``auto`` compiles on
        CUDA where Triton has what it builds with (``missing_triton_build_tools``)."""
        if self.compile == "auto":
            return device.type == "cuda" and missing_triton_build_tools() is None
        return self.compile == "on"

    @property
    def text_bucket(self) -> int:
        """Texts are zero-padded to a multiple of this many tokens (1: to the longest)."""
        padded = self.cuda_graphs == "on" or self.quantization == "fp8"
        return TEXT_BUCKET if padded else 1


def check(acceleration: Acceleration, device: torch.device) -> None:
    """Refuse, before any weights load, the modes this machine cannot run on ``device``: an
    attention backend that mis-handles Qwen's masks or is not installed, FP8 without a
    capable GPU or torchao, compilation on a GPU without Triton's build tools (``auto``
    then runs uncompiled) or without a writable compiler cache, CUDA graphs where they cannot
    apply (``check_cuda_graphs``), autotuning without compiled blocks. (A LoRA is only known
    to load once it has.)"""
    check_attention(acceleration.attention, masks=acceleration.text_padding == "mask")
    if acceleration.text_padding == "split" and (
        acceleration.attention.masked != AttentionBackends().masked
    ):
        logger.warning(
            "--masked_attention_backend %s has no effect with --text_padding split",
            acceleration.attention.masked,
        )
    if acceleration.quantization == "fp8":
        check_fp8(device)
    if acceleration.compile != "off" and device.type == "cuda":
        check_triton_build_tools(acceleration.compile)
    if acceleration.compiles(device):
        check_compile_caches()
    if acceleration.cuda_graphs == "on":
        check_cuda_graphs(acceleration, device)
    if acceleration.max_autotune == "on" and not acceleration.compiles(device):
        raise AccelerationError(
            "--max_autotune on needs compiled blocks (--compile on, or auto where Triton can "
            "build on a GPU), or use --max_autotune off"
        )


def check_cache_batching(acceleration: Acceleration, max_batch_size: int) -> None:
    """Refuse the step cache with cross-request batching: it decides once per transformer
    call, for the whole batch, whether to skip the blocks, so a request's images would depend
    on the requests that share its batch."""
    if acceleration.cache != "none" and max_batch_size > 1:
        raise AccelerationError(
            f"--cache {acceleration.cache} decides once per batch whether to skip the blocks, "
            f"so with --max_batch_size {max_batch_size} a request's images would depend on "
            "the requests batched with it: use --max_batch_size 1 with the cache, or "
            "--cache none"
        )


def apply(pipeline: DiffusionPipeline, acceleration: Acceleration) -> None:
    """Apply every mode of ``acceleration`` to a loaded pipeline (``check`` them first), in
    the order they compose: the LoRA is fused into bf16 weights before FP8 takes them, and
    compilation comes last."""
    install_exact_modules(pipeline.transformer, acceleration.text_padding)
    if acceleration.lora:  # the modules above keep the layers' names, which the LoRA targets
        fuse_lora(pipeline, acceleration.lora, acceleration.lora_weight_name)
    if acceleration.quantization == "fp8":
        quantize_fp8(pipeline.transformer)
    if acceleration.cache != "none":
        pipeline.transformer.enable_cache(CACHES[acceleration.cache](acceleration.cache_threshold))
    if acceleration.compiles(pipeline.transformer.device):
        # The cache hooks decide on the host whether to skip blocks: a graph break.
        fullgraph = acceleration.cache == "none"
        compile_blocks(
            pipeline.transformer,
            fullgraph,
            cuda_graphs=acceleration.cuda_graphs == "on",
            max_autotune=acceleration.max_autotune == "on",
        )


def install_exact_modules(transformer: torch.nn.Module, text_padding: str) -> None:
    """The transformer's modules every deployment runs, exact to rounding: padding-free
    attention (``text_padding`` ``split``), the feed-forwards' GELU epilogue and the step
    modulation. Layer names stay, so LoRAs and FP8 find the same layers afterwards."""
    if text_padding == "split":
        padding_free.install(transformer)
    feedforward.install(transformer)
    modulation.install(transformer)


def compile_blocks(
    transformer: torch.nn.Module,
    fullgraph: bool = True,
    cuda_graphs: bool = False,
    max_autotune: bool = False,
) -> RemovableHandle | None:
    """Compile the transformer's repeated blocks (``compile_repeated_blocks``).

    With ``max_autotune``, Inductor autotunes their kernels as it compiles them
    (``MAX_AUTOTUNE_OPTIONS``). With ``cuda_graphs``, Inductor's CUDA graph trees record each
    block's kernels at the second call of each shape and replay them after. Graph
    partitioning splits each block around the attention op, which must run outside (tagged
    ``cudagraph_unsafe``: it reads the text lengths on the host). A forward pre-hook starts a
    new CUDA graph step with each transformer call; without it each block's call would start
    one and free the outputs of the block before. Returns that hook's handle (None without
    CUDA graphs).
    """
    options = dict(MAX_AUTOTUNE_OPTIONS) if max_autotune else {}
    if cuda_graphs:
        options.update({"triton.cudagraphs": True, "graph_partition": True})
    transformer.compile_repeated_blocks(fullgraph=fullgraph, options=options or None)
    if not cuda_graphs:
        return None
    return transformer.register_forward_pre_hook(
        lambda *_: torch.compiler.cudagraph_mark_step_begin()
    )


def missing_triton_build_tools() -> str | None:
    """What Triton lacks here to build the CUDA driver module and kernel launchers it compiles
    the first time a compiled block runs, or None: a C compiler (``$CC``, gcc or clang, as
    Triton looks for one) and Python's headers."""
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return "no C compiler (gcc, clang or $CC)"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        return f"no Python headers ({headers})"
    return None


def check_triton_build_tools(compile_choice: str) -> None:
    """Refuse ``--compile on`` on a GPU where Triton cannot build; ``auto`` runs the blocks
    uncompiled there, and says so."""
    missing = missing_triton_build_tools()
    if missing is None:
        return
    if compile_choice == "on":
        raise AccelerationError(
            f"--compile on needs a C compiler and Python's headers on a GPU (Triton builds its "
            f"kernel launchers with them), and this machine has {missing}: install gcc, or "
            "use --compile off"
        )
    logger.warning(
        "--compile auto: the blocks run uncompiled, slower, because Triton cannot build here "
        "(%s); install gcc to compile them, or set --compile off to silence this",
        missing,
    )


def check_cuda_graphs(acceleration: Acceleration, device: torch.device) -> None:
    """Refuse CUDA graphs where they cannot apply: off CUDA, without compiled blocks (they
    replay what compiling made), with the padding mask (the text buckets need split
    attention to stay exact) or with the step cache (it decides on the host)."""
    if device.type != "cuda":
        problem = f"a CUDA GPU; the model is on {device}"
    elif not acceleration.compiles(device):
        problem = "compiled blocks (--compile on, or auto where Triton can build)"
    elif acceleration.text_padding != "split":
        problem = "--text_padding split"
    elif acceleration.cache != "none":
        problem = "no step cache (--cache none)"
    else:
        return
    raise AccelerationError(f"--cuda_graphs on needs {problem}, or use --cuda_graphs off")


def check_compile_caches() -> None:
    """Refuse compilation when TorchInductor (and Triton, where ``TRITON_CACHE_DIR`` names a
    directory) cannot write its cache: Inductor writes the code it generates there, so
    compiling would fail, and better now than after loading the weights."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    directories = [os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()]
    if os.environ.get("TRITON_CACHE_DIR"):
        directories.append(os.environ["TRITON_CACHE_DIR"])
    for directory in directories:
        try:
            os.makedirs(directory, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:
            raise AccelerationError(
                f"--compile needs a writable compiler cache, and {directory} is not "
                f"({exc.strerror or exc}): fix the volume or TORCHINDUCTOR_CACHE_DIR / "
                "TRITON_CACHE_DIR, or use --compile off"
            ) from exc


def check_attention(backends: AttentionBackends, masks: bool = True) -> None:
    """Refuse backends that would mis-handle Qwen's masks or cannot run in this environment;
    ``masks``: whether padded batches reach the masked backend (``--text_padding mask``)."""
    if masks and backends.masked not in MASK_CAPABLE_BACKENDS:
        raise AccelerationError(
            f"attention backend {backends.masked!r} cannot take the padding mask of batched "
            f"prompts: use one of {', '.join(MASK_CAPABLE_BACKENDS)}"
        )
    if backends.unmasked not in MASK_FREE_BACKENDS:
        raise AccelerationError(
            f"attention backend {backends.unmasked!r} is not supported for Qwen-Image: use one "
            f"of {', '.join(MASK_FREE_BACKENDS)}"
        )
    for name in {backends.masked, backends.unmasked} if masks else {backends.unmasked}:
        try:
            with attention_backend(name):
                pass
        except (RuntimeError, ValueError, ImportError) as exc:
            raise AccelerationError(f"attention backend {name!r} is not usable: {exc}") from exc


def fuse_lora(
    pipeline: DiffusionPipeline,
    source: str,
    weight_name: str | None = None,
    distillation: StepDistillation = LIGHTNING,
) -> None:
    """Load a LoRA (a file, a directory or a Hub repo id), fuse it into the transformer's
    weights, drop the adapter layers, and switch the scheduler to the distilled settings."""
    try:
        pipeline.load_lora_weights(source, weight_name=weight_name, adapter_name="fast")
    except (OSError, ValueError, KeyError) as exc:
        raise AccelerationError(f"cannot load the LoRA {source!r}: {exc}") from exc
    try:
        pipeline.fuse_lora(adapter_names=["fast"], lora_scale=1.0)
        pipeline.unload_lora_weights()
    except Exception as exc:  # the weights it loaded do not fit the transformer's
        raise AccelerationError(
            f"cannot fuse the LoRA {source!r} into the transformer: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipeline.scheduler.config, **distillation.scheduler
    )
    logger.info("Fused the LoRA %s; scheduler set to %s", source, distillation.scheduler)


def check_fp8(device: torch.device) -> None:
    """Refuse FP8 off a CUDA GPU of compute capability 8.9+ or without torchao."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise AccelerationError(
            f"--quantization fp8 needs a CUDA GPU of compute capability 8.9 or newer "
            f"(Ada, Hopper, Blackwell); the model is on {device}"
        )
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as exc:
        raise AccelerationError(
            f"--quantization fp8 needs torchao (pip install torchao): {exc}"
        ) from exc


def check_fp8_image_size(acceleration: Acceleration, min_size: int) -> None:
    """Refuse FP8 where the smallest image a request may ask for (``min_size`` square,
    rounded up to a valid size) has fewer tokens than FP8's kernels take (``FP8_MIN_ROWS``);
    an image has a token per ``SIZE_MULTIPLE`` x ``SIZE_MULTIPLE`` pixels."""
    if acceleration.quantization != "fp8":
        return
    side_tokens = -(-min_size // SIZE_MULTIPLE)
    if side_tokens**2 < FP8_MIN_ROWS:
        needed = (math.isqrt(FP8_MIN_ROWS - 1) + 1) * SIZE_MULTIPLE
        raise AccelerationError(
            f"--quantization fp8 needs a --min_size that allows no image under "
            f"{needed}x{needed} (it is {min_size}): on an H100, FP8's kernels refused images "
            f"of fewer than {FP8_MIN_ROWS} tokens"
        )


def quantize_fp8(transformer: torch.nn.Module) -> None:
    """FP8 weights and dynamically scaled FP8 activations (per row) for the linear layers of
    the transformer blocks, through torchao (``check_fp8`` first: a GPU of compute capability
    >= 8.9 and torchao)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(
        transformer,
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        filter_fn=is_block_projection,
    )


def is_block_projection(module: torch.nn.Module, name: str) -> bool:
    """The attention and MLP projections of the blocks: nearly all of a step's FLOPs. The
    per-sample modulation layers (one row per image) stay in bf16."""
    return (
        isinstance(module, torch.nn.Linear)
        and name.startswith("transformer_blocks.")
        and not name.split(".")[2].endswith("_mod")
    )


# About 12 tokens for Qwen's tokenizer; the warm-up repeats it 8 times.
LONGER_WARMUP_PROMPT = "a red cube on a wooden table in the morning light,"


def warmup_batches(
    sizes: Iterable[tuple[int, int]],
    negative_prompt: str | None,
    true_cfg_scale: float,
    with_image: bool,
) -> list[list[Job]]:
    """Short runs per ``(width, height)`` after which other text lengths and batch sizes
    compile nothing new: a single request, a batch of two, and a single request with another
    text length (a batch of one compiles apart from larger ones; the longer prompt is over
    ``TEXT_BUCKET`` tokens, so padded to buckets the lengths still differ).
    ``with_image`` (edit): also an input image of another aspect ratio, which changes the
    condition's token count. Two steps each: CUDA graphs record a shape at its second call.
    """
    batches = []
    for width, height in sizes:
        image = Image.new("RGB", (width, height), "gray") if with_image else None
        short = Job(
            prompt="a cube",
            negative_prompt=negative_prompt,
            seeds=(0,),
            width=width,
            height=height,
            num_inference_steps=2,
            true_cfg_scale=true_cfg_scale,
            images=() if image is None else (image,),
        )
        longer = replace(short, prompt=" ".join([LONGER_WARMUP_PROMPT] * 8))
        batches += [[short], [longer, short], [longer]]
        if with_image:
            other_aspect = Image.new("RGB", (width, height * 3 // 4), "gray")
            batches.append([replace(short, images=(other_aspect,))])
    return batches


def compile_by_warming_up(
    pipeline: DiffusionPipeline, batches: Iterable[list[Job]], acceleration: Acceleration
) -> None:
    """Compile the blocks by running ``batches`` (``warm_up``). With ``--compile auto`` a
    failure (Inductor, Triton, GPU memory) is logged and the blocks run uncompiled from then
    on: the predictor serves, slower, rather than not at all. With ``on`` it is raised as an
    ``AccelerationError``."""
    try:
        warm_up(pipeline, batches, acceleration)
    except Exception as exc:
        if acceleration.compile != "auto":
            raise AccelerationError(
                f"--compile {acceleration.compile}: compiling the transformer blocks failed "
                f"at load ({type(exc).__name__}: {_first_line(exc)}); use --compile auto to "
                "serve uncompiled when it fails, or --compile off"
            ) from exc
        logger.exception(
            "--compile auto: compiling the transformer blocks failed, so they run uncompiled "
            "(slower); set --compile off to skip compiling, or on to stop here instead"
        )
        torch.compiler.set_stance("force_eager")


def warm_up(
    pipeline: DiffusionPipeline, batches: Iterable[list[Job]], acceleration: Acceleration
) -> float:
    """Run each batch once as ``acceleration`` runs requests (compiling, and recording CUDA
    graphs for, what the batches' shapes need); the seconds it took."""
    started = time.perf_counter()
    for jobs in batches:
        generate(
            pipeline,
            jobs,
            attention=acceleration.attention,
            text_bucket=acceleration.text_bucket,
        )
    seconds = time.perf_counter() - started
    logger.info("Warm-up done in %.1f s", seconds)
    return seconds
