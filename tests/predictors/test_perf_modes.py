"""Speed-mode flags reach the pipeline: a tiny predictor is built from parsed flags and loaded
in-process, through the same path as the server."""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.hooks import HookRegistry
from diffusers.models.activations import GELU
from PIL import Image
from safetensors.torch import load_file
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from predictors import acceleration, attention, feedforward, modulation
from predictors import model as model_module
from predictors.acceleration import Acceleration, AccelerationError
from predictors.denoise import (
    AttentionBackends,
    Job,
    generate,
    pad_text,
    takes_several_images,
)
from predictors.edit import QwenImageEditModel
from predictors.generation import QwenImageGenerationModel
from predictors.model import QwenImageModel
from predictors.server import build_parser, options_from_args, serve
from predictors.tiny import tiny_pipeline_dir
from tests.servers import PROJECT_ROOT


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    """A CPU predictor's load() leaves one core to the event loop; undo it for later tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the predictor loads a pipeline: modes it must refuse are refused
    before the weights load (minutes for the real model)."""

    def load_pipeline(*args, **kwargs):
        raise AssertionError("the weights were loaded before the modes were checked")

    monkeypatch.setattr(model_module, "load_pipeline", load_pipeline)


def load_model(
    tiny_cache_env: dict[str, str],
    *flags: str,
    model_class: type[QwenImageModel] = QwenImageGenerationModel,
) -> QwenImageModel:
    args = build_parser(model_class).parse_args(
        ["--tiny_cache_dir", tiny_cache_env["QWEN_TINY_CACHE_DIR"], *flags]
    )
    model = model_class(model_class.default_name, options_from_args(args))
    model.load()
    model.stop()
    return model


def test_defaults_change_nothing(tiny_cache_env):
    model = load_model(tiny_cache_env)
    blocks = model.pipeline.transformer.transformer_blocks
    assert model.runner.policy.max_batch_size == 1
    assert model.runner.capacity == 5  # one running and --max_queue_size=4 waiting, as before
    assert model.defaults.num_inference_steps == 50 and model.defaults.true_cfg_scale == 4.0
    assert blocks[0]._compiled_call_impl is None  # --compile auto: not on a CPU
    assert not HookRegistry.check_if_exists_or_initialize(blocks[0]).hooks
    assert attention.installed(model.pipeline.transformer)  # --text_padding split
    assert feedforward.installed(model.pipeline.transformer)  # exact to bf16 rounding
    assert modulation.installed(model.pipeline.transformer)  # exact to rounding


def test_feedforwards_take_the_gelu_epilogue_and_step_aside_for_the_baseline(tiny_cache_env):
    """Every block's tanh-GELU projections become ``EpilogueGELU`` on the same linear layer
    (its parameter names stay, for LoRAs and FP8); ``as_diffusers`` turns the epilogue off for
    the benchmark's baseline and back on. The epilogue itself runs on CUDA only (on a CPU the
    op's GELU is the erf one): its images are compared with the baseline's on a GPU."""
    model = load_model(tiny_cache_env)
    transformer = model.pipeline.transformer
    blocks = transformer.transformer_blocks
    modules = [mlp.net[0] for block in blocks for mlp in (block.img_mlp, block.txt_mlp)]
    assert all(isinstance(module, feedforward.EpilogueGELU) for module in modules)
    assert "transformer_blocks.0.img_mlp.net.0.proj.weight" in dict(transformer.named_parameters())
    feedforward.install(transformer)  # a second call changes nothing
    assert [mlp.net[0] for block in blocks for mlp in (block.img_mlp, block.txt_mlp)] == modules
    with feedforward.as_diffusers(transformer):
        assert not any(module.epilogue for module in modules)
    assert all(module.epilogue for module in modules)
    gelu = GELU(8, 32, approximate="tanh")  # off CUDA: diffusers' own computation
    inputs = torch.randn(2, 5, 8)
    assert torch.equal(feedforward.EpilogueGELU(gelu)(inputs), gelu(inputs))
    # The epilogue's call (the product's operands and shapes), with a CPU's erf GELU; compiled,
    # it stays one op, which Inductor calls as it is (no product and GELU apart).
    weight, bias = gelu.proj.weight.detach(), gelu.proj.bias.detach()
    compiled = torch.compile(feedforward.linear_gelu, fullgraph=True)
    fused, code = run_and_get_code(compiled, inputs, weight, bias)
    expected = torch.nn.functional.gelu(gelu.proj(inputs), approximate="none")
    assert fused.shape == (2, 5, 32) and torch.allclose(fused, expected, atol=1e-6)
    assert "torch.ops.aten._addmm_activation.default(" in "\n".join(code)


class Float8Weights(torch.Tensor):
    """Stands for torchao's FP8 weights: a tensor subclass, kept so as a parameter."""


def test_only_plain_weights_with_a_bias_take_the_gelu_epilogue():
    """cuBLASLt's epilogue takes plain weights and a bias: FP8 weights (a tensor subclass,
    which ``torch.nn.Parameter`` keeps as it is) and bias-free layers run as diffusers does."""
    plain = torch.nn.Linear(8, 32)
    assert feedforward.takes_epilogue(plain)
    assert not feedforward.takes_epilogue(torch.nn.Linear(8, 32, bias=False))
    quantized = torch.nn.Linear(8, 32)
    quantized.weight = torch.nn.Parameter(plain.weight.detach().as_subclass(Float8Weights))
    assert type(quantized.weight) is Float8Weights
    assert not feedforward.takes_epilogue(quantized)


def test_text_padding_mask_keeps_diffusers_processor(tiny_cache_env):
    model = load_model(tiny_cache_env, "--text_padding", "mask")
    assert not attention.installed(model.pipeline.transformer)
    job = Job("a red cube on a wooden table", " ", (3,), 64, 64, 2, 4.0)
    split = load_model(tiny_cache_env)
    (masked_image,) = generate(model.pipeline, [job], output_type="np")
    (split_image,) = generate(split.pipeline, [job], output_type="np")
    assert np.abs(masked_image - split_image).max() < 1e-5


def test_lora_flag_fuses_the_weights_and_sets_lightning(tiny_cache_env, tiny_lora):
    base = load_model(tiny_cache_env)
    fast = load_model(tiny_cache_env, "--lora", str(tiny_lora), "--lora_steps", "4")

    base_q = base.pipeline.transformer.transformer_blocks[0].attn.to_q
    fast_q = fast.pipeline.transformer.transformer_blocks[0].attn.to_q
    assert type(fast_q) is torch.nn.Linear, "the adapter layers are gone once fused"
    # Fused at full strength: W + B @ A (the file gives no alpha, so alpha is the rank).
    lora = load_file(tiny_lora)
    prefix = "transformer.transformer_blocks.0.attn.to_q"
    delta = lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]
    assert torch.allclose(fast_q.weight, base_q.weight + delta, atol=1e-5)
    assert torch.equal(  # the LoRA only touches the attention projections
        base.pipeline.transformer.transformer_blocks[0].img_mlp.net[2].weight,
        fast.pipeline.transformer.transformer_blocks[0].img_mlp.net[2].weight,
    )

    scheduler = fast.pipeline.scheduler.config
    assert scheduler.base_shift == scheduler.max_shift == pytest.approx(math.log(3))
    assert scheduler.shift_terminal is None
    assert (fast.defaults.num_inference_steps, fast.defaults.true_cfg_scale) == (4, 1.0)

    job = Job("a cat", "", (1,), 64, 64, 4, 1.0)
    (base_image,) = generate(base.pipeline, [job], output_type="np")
    (fast_image,) = generate(fast.pipeline, [job], output_type="np")
    assert np.abs(base_image - fast_image).max() > 1e-3


def test_a_missing_lora_is_a_clear_error(tiny_cache_env, tmp_path):
    with pytest.raises(AccelerationError, match="cannot load the LoRA"):
        load_model(tiny_cache_env, "--lora", str(tmp_path / "missing.safetensors"))


def test_cache_and_compile_flags_reach_the_transformer(tiny_cache_env):
    """The step cache's hooks decide on the host, between compiled blocks: they compile with
    graph breaks (compiled whole, the load-time warm-up fails)."""
    model = load_model(
        tiny_cache_env, "--cache", "first_block", "--compile", "on", "--warmup_sizes", "64x64"
    )
    blocks = model.pipeline.transformer.transformer_blocks
    assert "fbc_leader_block_hook" in HookRegistry.check_if_exists_or_initialize(blocks[0]).hooks
    assert all(block._compiled_call_impl is not None for block in blocks)
    (image,) = generate(model.pipeline, [Job("a cat", " ", (1,), 64, 64, 3, 4.0)], output_type="np")
    assert image.shape == (1, 64, 64, 3)


def test_compiled_blocks_take_any_mix_of_prompts_without_recompiling(tiny_cache_env):
    """After the load-time warm-up, batches of 1 to 8 requests with prompts of any lengths,
    and another step count (another table of precomputed modulation), compile nothing more (a
    per-batch recompile would stall requests, and past dynamo's recompile limit fail them),
    and give the uncompiled images to float32 rounding."""
    model = load_model(tiny_cache_env, "--compile", "on", "--warmup_sizes", "64x64")
    graphs = counters["stats"]["unique_graphs"]
    sentence = "a red green cube sphere on the old wooden table in morning light"
    jobs = [  # prompts of 1 to 64 characters
        Job(sentence[: 1 + (29 * index) % len(sentence)], " ", (index,), 64, 64, 2, 4.0)
        for index in range(8)
    ]
    batches = [jobs[:1], jobs[:8], jobs[2:5], jobs[5:7], jobs[1:7:2]]
    batches.append([replace(jobs[3], num_inference_steps=3)])
    compiled = [generate(model.pipeline, batch, output_type="np") for batch in batches]
    assert counters["stats"]["unique_graphs"] == graphs, "a mixed batch recompiled the blocks"

    blocks = model.pipeline.transformer.transformer_blocks
    for block in blocks:
        block._compiled_call_impl = None  # the same weights, uncompiled
    for batch, images in zip(batches, compiled, strict=True):
        eager = generate(model.pipeline, batch, output_type="np")
        assert max(np.abs(a - b).max() for a, b in zip(images, eager, strict=True)) < 1e-4


def test_compiled_edit_blocks_take_other_aspect_ratios_without_recompiling(tiny_cache_env):
    """The edit condition's token count follows the input's aspect ratio: the warm-up
    compiles it as dynamic, so new aspect ratios and output sizes compile nothing more."""
    model = load_model(
        tiny_cache_env,
        "--compile",
        "on",
        "--warmup_sizes",
        "64x64",
        model_class=QwenImageEditModel,
    )
    graphs = counters["stats"]["unique_graphs"]
    for (width, height), prompt in [((96, 64), "make it red"), ((64, 128), "now blue, please")]:
        image = Image.new("RGB", (width, height), "white")
        generate(model.pipeline, [Job(prompt, " ", (0,), width, height, 2, 4.0, (image,))])
    assert counters["stats"]["unique_graphs"] == graphs, "a new aspect ratio recompiled"


def test_compiled_plus_blocks_take_several_images_without_recompiling(tiny_cache_env):
    """Qwen-Image-Edit-2509's pipeline, warmed up with one input image: two and three images
    (more condition tokens, more RoPE segments) compile nothing more."""
    location = tiny_pipeline_dir("edit-plus", Path(tiny_cache_env["QWEN_TINY_CACHE_DIR"]))
    model = load_model(
        tiny_cache_env,
        "--qwen_image_edit_location",
        str(location),
        "--compile",
        "on",
        "--warmup_sizes",
        "64x64",
        model_class=QwenImageEditModel,
    )
    assert takes_several_images(model.pipeline)
    graphs = counters["stats"]["unique_graphs"]
    for count in (2, 3):
        images = tuple(Image.new("RGB", (96, 64), "white") for _ in range(count))
        generate(model.pipeline, [Job("put them together", " ", (0,), 64, 64, 2, 4.0, images)])
    assert counters["stats"]["unique_graphs"] == graphs, "more input images recompiled"


def test_two_warmup_sizes_leave_no_image_size_to_compile(tiny_cache_env):
    """One warm-up size leaves the image's token count static, so the first other size
    compiles again (a stalled batch); with two, that is done at load."""
    model = load_model(tiny_cache_env, "--compile", "on", "--warmup_sizes", "64x64,96x64")
    graphs = counters["stats"]["unique_graphs"]
    for width, height in ((64, 128), (128, 96)):
        generate(model.pipeline, [Job("a cat on a mat", " ", (0,), width, height, 2, 4.0)])
    assert counters["stats"]["unique_graphs"] == graphs, "a new image size recompiled"


@pytest.mark.parametrize("variable", ["TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"])
def test_an_unwritable_compiler_cache_stops_the_start_before_the_weights_load(
    tiny_cache_env, tmp_path, monkeypatch, caplog, variable, no_weights
):
    """Inductor writes the code it generates to its cache: a full or read-only volume would
    fail the warm-up after minutes of loading weights. The predictor refuses at once."""
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    monkeypatch.setenv(variable, str(not_a_directory / "cache"))
    caplog.set_level(logging.ERROR)
    argv = ["--tiny_cache_dir", tiny_cache_env["QWEN_TINY_CACHE_DIR"], "--compile", "on"]
    with pytest.raises(SystemExit) as exit_info:
        serve(QwenImageGenerationModel, argv)
    assert exit_info.value.code == 2
    assert f"--compile needs a writable compiler cache, and {not_a_directory}" in caplog.text


@pytest.fixture
def no_c_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A machine without gcc, clang or $CC, as a python:*-slim image is."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))


def test_compile_on_a_gpu_without_a_c_compiler_is_refused_and_auto_runs_uncompiled(
    no_c_compiler, caplog
):
    """Triton builds its kernel launchers with a C compiler the first time a compiled block
    runs on a GPU. Without one, ``--compile on`` is refused before the weights load (not at
    the warm-up), and ``auto``, the default, runs the blocks uncompiled and says why."""
    gpu = torch.device("cuda")  # only inspected: no GPU is needed
    assert acceleration.missing_triton_build_tools() == "no C compiler (gcc, clang or $CC)"
    with pytest.raises(AccelerationError, match="--compile on needs a C compiler"):
        acceleration.check(Acceleration(compile="on"), gpu)
    caplog.set_level(logging.WARNING)
    acceleration.check(Acceleration(compile="auto"), gpu)
    assert "--compile auto: the blocks run uncompiled" in caplog.text
    assert not Acceleration(compile="auto").compiles(gpu)
    assert Acceleration(compile="on").compiles(torch.device("cpu"))  # Inductor's C++, not Triton


@pytest.fixture
def compiler_stance_restored() -> Iterator[None]:
    yield
    torch.compiler.set_stance("default")


@pytest.fixture
def warm_up_fails_on_recompile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make dynamo fail the warm-up at its first recompile. The warm-up runs on the worker
    thread, and dynamo's settings are per thread, so they are set there."""
    warm_up = acceleration.warm_up

    def failing_warm_up(*args):
        with torch._dynamo.config.patch(error_on_recompile=True):
            return warm_up(*args)

    monkeypatch.setattr(acceleration, "warm_up", failing_warm_up)
    torch._dynamo.reset()


def test_compile_auto_serves_uncompiled_when_compiling_fails_at_load(
    tiny_cache_env, monkeypatch, caplog, compiler_stance_restored, warm_up_fails_on_recompile
):
    """A compile that fails at load (on a GPU: Inductor, Triton, memory) leaves ``--compile
    auto``'s blocks uncompiled, logged: the predictor loads and serves, slower. Here dynamo
    is told to fail on the warm-up's first recompile."""
    monkeypatch.setattr(Acceleration, "compiles", lambda self, device: True)  # as on a GPU
    caplog.set_level(logging.ERROR)
    model = load_model(tiny_cache_env)  # --compile auto, the default
    assert "--compile auto: compiling the transformer blocks failed" in caplog.text
    assert "RecompileError" in caplog.text
    job = Job("a red cube on a wooden table", " ", (3,), 64, 64, 2, 4.0)
    graphs = counters["stats"]["unique_graphs"]
    (image,) = generate(model.pipeline, [job], output_type="np")
    assert counters["stats"]["unique_graphs"] == graphs, "nothing compiles any more"
    eager = load_model(tiny_cache_env, "--compile", "off")
    (expected,) = generate(eager.pipeline, [job], output_type="np")
    np.testing.assert_array_equal(image, expected)


def serve_to_exit(tiny_cache_env: dict[str, str], caplog, *flags: str) -> str:
    """Run the server's entry point in-process until it exits with code 2; its log."""
    caplog.set_level(logging.ERROR)
    argv = ["--tiny_cache_dir", tiny_cache_env["QWEN_TINY_CACHE_DIR"], *flags]
    with pytest.raises(SystemExit) as exit_info:
        serve(QwenImageGenerationModel, argv)
    assert exit_info.value.code == 2
    return caplog.text


def test_compile_on_stops_the_start_when_compiling_fails_at_load(
    tiny_cache_env, caplog, warm_up_fails_on_recompile
):
    """With a one-line error and exit code 2, as other unusable speed modes, rather than a
    traceback and exit code 1."""
    log = serve_to_exit(tiny_cache_env, caplog, "--compile", "on")
    assert "--compile on: compiling the transformer blocks failed at load (RecompileError" in log
    assert "Traceback" not in log


def test_a_lora_that_cannot_be_fused_stops_the_start_with_a_clear_error(
    tiny_cache_env, tiny_lora, caplog, monkeypatch
):
    def fuse_lora(*args, **kwargs):
        raise RuntimeError("The size of tensor a (32) must match the size of tensor b (64)")

    monkeypatch.setattr(QwenImagePipeline, "fuse_lora", fuse_lora)
    log = serve_to_exit(tiny_cache_env, caplog, "--lora", str(tiny_lora))
    assert f"cannot fuse the LoRA '{tiny_lora}' into the transformer: RuntimeError: " in log
    assert "Traceback" not in log


def test_the_warm_up_runs_on_the_worker_thread(tiny_cache_env, monkeypatch):
    """Where requests run: CUDA graphs record per thread, so a warm-up elsewhere would leave
    the first requests to record again."""
    threads = []
    monkeypatch.setattr(
        acceleration,
        "compile_by_warming_up",
        lambda *args: threads.append(threading.current_thread().name),
    )
    model = load_model(tiny_cache_env, "--compile", "on")
    assert threads == [f"pipeline-{model.name}"]


@pytest.mark.parametrize(
    ("modes", "device", "problem"),
    [
        (Acceleration(cuda_graphs="on"), "cpu", "a CUDA GPU; the model is on cpu"),
        (Acceleration(cuda_graphs="on", compile="off"), "cuda", "compiled blocks"),
        (Acceleration(cuda_graphs="on", text_padding="mask"), "cuda", "--text_padding split"),
        (Acceleration(cuda_graphs="on", cache="first_block"), "cuda", "no step cache"),
    ],
    ids=["cpu", "uncompiled", "mask", "cache"],
)
def test_cuda_graphs_are_refused_where_they_cannot_apply(modes, device, problem):
    with pytest.raises(AccelerationError, match=f"--cuda_graphs on needs {re.escape(problem)}"):
        acceleration.check(modes, torch.device(device))


def test_cuda_graphs_on_a_gpu_pass_the_checks_and_pad_texts_to_buckets():
    """Checked for a CUDA device without one: the checks only read the device's type (the
    compiler and its cache are this machine's)."""
    modes = Acceleration(cuda_graphs="on")
    acceleration.check(modes, torch.device("cuda"))
    assert modes.text_bucket == acceleration.TEXT_BUCKET == 64
    assert Acceleration().text_bucket == 1


@pytest.mark.parametrize(
    ("modes", "device", "refused"),
    [
        (Acceleration(max_autotune="on", compile="off"), "cuda", True),
        (Acceleration(max_autotune="on"), "cpu", True),  # auto compiles on CUDA only
        (Acceleration(max_autotune="on", compile="on"), "cpu", False),
    ],
    ids=["uncompiled", "auto-on-a-cpu", "compiled-on-a-cpu"],
)
def test_max_autotune_needs_compiled_blocks(modes, device, refused):
    if refused:
        with pytest.raises(AccelerationError, match="--max_autotune on needs compiled blocks"):
            acceleration.check(modes, torch.device(device))
    else:
        acceleration.check(modes, torch.device(device))


def test_max_autotune_hands_inductor_its_options_as_the_blocks_compile(tiny_cache_env, monkeypatch):
    """``--max_autotune on`` compiles the blocks with Inductor's autotuning options, merged
    with CUDA graphs' when both are on (bench/gpu_pipelines.py --smoke runs it end to end)."""
    calls = []
    compile_repeated_blocks = QwenImageTransformer2DModel.compile_repeated_blocks

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("options"))
        return compile_repeated_blocks(self, *args, **kwargs)

    monkeypatch.setattr(QwenImageTransformer2DModel, "compile_repeated_blocks", spy)
    model = load_model(
        tiny_cache_env, "--compile", "on", "--max_autotune", "on", "--warmup_sizes", "none"
    )
    assert calls == [acceleration.MAX_AUTOTUNE_OPTIONS]
    transformer = model.pipeline.transformer
    acceleration.compile_blocks(transformer, cuda_graphs=True, max_autotune=True).remove()
    graphs = {"triton.cudagraphs": True, "graph_partition": True}
    assert calls[-1] == {**acceleration.MAX_AUTOTUNE_OPTIONS, **graphs}
    acceleration.compile_blocks(transformer)
    assert calls[-1] is None


def test_fp8_pads_texts_to_buckets():
    """FP8's text stream needs at least 48 rows for cuBLASLt's kernels on an H100 (run 8):
    a short prompt alone has fewer, padded to a bucket it has 64."""
    bucket = Acceleration(quantization="fp8").text_bucket
    assert bucket == acceleration.TEXT_BUCKET == 64
    short_prompt = torch.zeros(6, 8)
    padded, mask = pad_text([short_prompt], bucket)
    assert padded.shape[1] >= acceleration.FP8_MIN_ROWS and mask.sum() == 6


@pytest.mark.parametrize(
    ("quantization", "min_size", "refused"),
    [
        ("fp8", 64, True),
        ("fp8", 96, True),
        ("fp8", 100, False),
        ("fp8", 256, False),
        ("none", 64, False),
    ],
)
def test_fp8_refuses_images_too_small_for_its_kernels(quantization, min_size, refused):
    """FP8 needs 48 image tokens (7x7 of 16x16 pixels: 112x112); --min_size 100 allows no
    smaller valid size, since sizes are multiples of 16."""
    modes = Acceleration(quantization=quantization)
    if refused:
        with pytest.raises(AccelerationError, match="112x112"):
            acceleration.check_fp8_image_size(modes, min_size)
    else:
        acceleration.check_fp8_image_size(modes, min_size)


@pytest.mark.parametrize(
    ("capability", "refused"),
    [((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False), ((10, 0), False)],
)
def test_fp8_needs_a_gpu_of_compute_capability_8_9(monkeypatch, capability, refused):
    """Ada (8.9), Hopper (9.0) and Blackwell have FP8 tensor cores; Ampere (8.0, 8.6) not.
    Without torchao (as here), a capable GPU gets the torchao error instead."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with pytest.raises(AccelerationError) as refusal:
        acceleration.check_fp8(torch.device("cuda"))
    needs_capability = "compute capability 8.9" in str(refusal.value)
    assert needs_capability == refused, refusal.value
    if not refused:
        assert "needs torchao" in str(refusal.value)


def test_fp8_takes_the_blocks_attention_and_mlp_projections_only(tiny_cache_env):
    """FP8 quantizes the blocks' projections, not the modulation layers (a row per image)
    nor the layers outside the blocks."""
    transformer = load_model(tiny_cache_env).pipeline.transformer
    chosen = {
        name
        for name, module in transformer.named_modules()
        if acceleration.is_block_projection(module, name)
    }
    layers = {name.split(".", 2)[2] for name in chosen}
    assert layers == {
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    }  # fmt: skip
    assert {name.split(".")[1] for name in chosen} == {"0", "1"}  # every block
    assert not any("_mod" in name for name in chosen)


@pytest.mark.parametrize(("max_batch_size", "refused"), [(1, False), (2, True)])
def test_the_step_cache_takes_no_batch_of_two(max_batch_size, refused):
    modes = Acceleration(cache="first_block")
    if refused:
        with pytest.raises(AccelerationError, match="decides once per batch"):
            acceleration.check_cache_batching(modes, max_batch_size)
    else:
        acceleration.check_cache_batching(modes, max_batch_size)


def test_a_masked_backend_that_split_padding_never_uses_is_let_through(caplog):
    """With split padding no batch takes the mask, so a mask-refusing masked backend only
    gets a warning that it does nothing."""
    modes = Acceleration(attention=AttentionBackends(masked="flash"))
    with caplog.at_level(logging.WARNING, logger=acceleration.logger.name):
        acceleration.check(modes, torch.device("cpu"))
    assert "--masked_attention_backend flash has no effect with --text_padding split" in (
        caplog.text
    )


def test_compile_blocks_with_cuda_graphs_marks_each_forward_as_a_step(tiny_cache_env, monkeypatch):
    """The hook that starts a CUDA graph step per transformer call comes and goes with
    ``compile_blocks`` (bench/gpu_pipelines.py --smoke runs the mode end to end; on a CPU
    Inductor declines the graphs)."""
    model = load_model(tiny_cache_env)
    transformer = model.pipeline.transformer
    assert acceleration.compile_blocks(transformer) is None
    assert not transformer._forward_pre_hooks
    marker = acceleration.compile_blocks(transformer, cuda_graphs=True)
    for block in transformer.transformer_blocks:
        block._compiled_call_impl = None  # the hook is what is tested: skip compiling
    steps = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    generate(model.pipeline, [Job("a cat", " ", (1,), 64, 64, 3, 4.0)], text_bucket=64)
    assert len(steps) == 3  # one per step: batched CFG is one transformer call
    marker.remove()
    assert not transformer._forward_pre_hooks


def test_compile_auto_compiles_on_a_gpu_where_triton_can_build():
    assert acceleration.missing_triton_build_tools() is None  # gcc and Python's headers here
    assert Acceleration(compile="auto").compiles(torch.device("cuda"))
    assert not Acceleration(compile="auto").compiles(torch.device("cpu"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--quantization", "fp8"],
            "--quantization fp8 needs a CUDA GPU of compute capability 8.9",
        ),
        (["--cuda_graphs", "on"], "--cuda_graphs on needs a CUDA GPU"),
        (["--max_autotune", "on"], "--max_autotune on needs compiled blocks"),
    ],
    ids=["fp8", "cuda_graphs", "max_autotune"],
)
def test_gpu_modes_on_a_cpu_exit_with_a_clear_error_before_the_weights_load(
    tiny_cache_env, caplog, no_weights, flags, message
):
    assert message in serve_to_exit(tiny_cache_env, caplog, *flags)


def test_the_step_cache_with_cross_request_batching_is_refused_before_the_weights_load(
    tiny_cache_env, caplog, no_weights
):
    """FirstBlockCache decides once per transformer call, for the whole batch: batched, a
    request's images would depend on its batch-mates."""
    log = serve_to_exit(tiny_cache_env, caplog, "--cache", "first_block", "--max_batch_size", "4")
    assert (
        "--cache first_block decides once per batch whether to skip the blocks, so with "
        "--max_batch_size 4 a request's images would depend on the requests batched with it"
    ) in log


def test_an_attention_backend_that_refuses_masks_is_refused_for_masked_batches(
    tiny_cache_env, no_weights
):
    with pytest.raises(AccelerationError, match="cannot take the padding mask"):
        load_model(tiny_cache_env, "--text_padding", "mask", "--masked_attention_backend", "flash")


def test_split_padding_lets_a_mask_refusing_backend_run_padded_batches(tiny_cache_env):
    model = load_model(tiny_cache_env, "--attention_backend", "_native_flash")
    job = Job("a red cube on a wooden table", " ", (3,), 64, 64, 2, 4.0)  # texts differ
    (image,) = generate(
        model.pipeline, [job], attention=model.options.acceleration.attention, output_type="np"
    )
    assert image.shape == (1, 64, 64, 3)


def documented_flags() -> dict[str, tuple[str, str]]:
    """docs/predictors.md's Configuration table: each environment variable's flag and the
    default as written (a row may pair two, ``--min_size`` / ``--max_size``)."""
    text = (PROJECT_ROOT / "docs" / "predictors.md").read_text()
    table = text.split("## Configuration", 1)[1].split("\n\n| flag |", 1)[1].split("\n\n", 1)[0]
    found = {}
    for row in table.splitlines()[2:]:
        flags, variables, defaults = (cell.strip("| ") for cell in row.split(" | ")[:3])
        split = [cell.split(" / ") for cell in (flags, variables, defaults)]
        if len(split[2]) != len(split[0]):  # one default for the pair
            split[2] = split[2] * len(split[0])
        for flag, variable, default in zip(*split, strict=True):
            found[variable.strip("`")] = (flag.strip("`"), default)
    return found


def test_the_docs_give_every_flag_its_variable_and_default(monkeypatch):
    """docs/predictors.md's table is what an operator sets a predictor by: each flag (but
    KServe's own) has its row, with the variable it reads and the code's default."""
    for variable in [name for name in os.environ if name.startswith("QWEN_")]:
        monkeypatch.delenv(variable)
    documented = documented_flags()
    read = set()
    for model_class in (QwenImageGenerationModel, QwenImageEditModel):
        for action in build_parser(model_class)._actions:
            variable = re.search(r"\(env (\w+)\)", action.help or "")
            if variable is None:
                continue  # KServe's flags, and --help
            read.add(variable[1])
            assert variable[1] in documented, f"docs/predictors.md lacks {variable[1]}"
            flag, default = documented[variable[1]]
            assert flag == action.option_strings[0], (variable[1], flag)
            value = re.match(r"`([^`]*)`|(\w+)", default)
            value = value[1] if value[1] is not None else value[2]
            if action.default is None:
                expected = {"QWEN_TINY_CACHE_DIR": "~/.cache/qwen-image-serve"}
                assert value == expected.get(variable[1], "unset"), (variable[1], default)
            elif isinstance(action.default, (int, float)):
                assert float(value) == action.default, (variable[1], default)
            else:
                assert value == str(action.default), (variable[1], default)
    assert {"QWEN_IMAGE_LOCATION", "QWEN_IMAGE_EDIT_LOCATION", "QWEN_DEVICE"} <= read
    assert documented.keys() == read, "rows of variables no predictor reads"


def test_flags_read_their_environment_variables(monkeypatch):
    monkeypatch.setenv("QWEN_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("QWEN_BATCH_WAIT_MS", "25")
    monkeypatch.setenv("QWEN_WARMUP_SIZES", "1328x1328,1664x928")
    monkeypatch.setenv("QWEN_CACHE", "first_block")
    monkeypatch.setenv("QWEN_TEXT_PADDING", "mask")
    monkeypatch.setenv("QWEN_CUDA_GRAPHS", "on")
    monkeypatch.setenv("QWEN_MAX_AUTOTUNE", "on")
    options = options_from_args(build_parser(QwenImageGenerationModel).parse_args([]))
    assert options.acceleration.text_padding == "mask"
    assert options.acceleration.cuda_graphs == "on"
    assert options.acceleration.max_autotune == "on"
    assert (options.batching.max_batch_size, options.batching.batch_wait_ms) == (8, 25.0)
    assert options.acceleration.warmup_sizes == ((1328, 1328), (1664, 928))
    assert options.acceleration.cache == "first_block"
    with pytest.raises(SystemExit):
        build_parser(QwenImageGenerationModel).parse_args(["--quantization", "int3"])
    monkeypatch.setenv("QWEN_COMPILE", "yes")  # argparse does not check defaults' choices
    with pytest.raises(SystemExit) as exit_info:
        serve(QwenImageGenerationModel, [])
    assert exit_info.value.code == 2
