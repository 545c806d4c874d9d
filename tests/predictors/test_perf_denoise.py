"""The explicit denoising loop against diffusers' own pipeline calls, in float32 on tiny pipelines.

Batched CFG (one forward for both texts, padded) and cross-request batches must give the
images of the plain pipeline call on the same seeds, to float32 rounding: with diffusers'
padding mask, and with the padding-free attention of ``predictors.attention``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    QwenImageEditInpaintPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from PIL import Image
from torch._inductor.utils import run_and_get_code

from bench.gpu_pipelines import run_baseline
from predictors import attention, denoise, modulation
from predictors.denoise import (
    AttentionBackends,
    Job,
    _to_pil,
    generate,
    pad_text,
    preview_steps,
)
from predictors.loading import load_pipeline, resolve_location
from predictors.tiny import build_transformer

TOLERANCE = 1e-5  # images in [0, 1]
CPU = torch.device("cpu")


def tiny(pipeline_class, kind: str, directory, text_padding: str):
    pipeline = load_pipeline(
        pipeline_class, resolve_location(None, kind, directory), CPU, torch.float32
    )
    if text_padding == "split":
        attention.install(pipeline.transformer)
    modulation.install(pipeline.transformer)  # as a deployment runs it
    return pipeline


@pytest.fixture(scope="module", params=["mask", "split"])
def generation(request, tmp_path_factory) -> QwenImagePipeline:
    return tiny(QwenImagePipeline, "generation", tmp_path_factory.mktemp("tiny"), request.param)


@pytest.fixture(scope="module", params=["mask", "split"])
def edit(request, tmp_path_factory) -> QwenImageEditPipeline:
    return tiny(QwenImageEditPipeline, "edit", tmp_path_factory.mktemp("tiny"), request.param)


@pytest.mark.parametrize(
    ("prompt", "negative_prompt", "cfg"),
    [
        ("a red cube on a wooden table", " ", 4.0),  # texts of different lengths: masked
        ("abc", "xyz", 2.5),  # same length: no mask, the mask-free path
        ("a cat", None, 4.0),  # no negative prompt: no CFG, one pass
    ],
    ids=["masked", "unmasked", "no-cfg"],
)
def test_batched_cfg_equals_the_pipelines_two_passes(generation, prompt, negative_prompt, cfg):
    job = Job(prompt, negative_prompt, (7,), 64, 48, 3, cfg)
    expected = run_baseline(generation, job)
    (actual,) = generate(generation, [job], output_type="np")
    assert np.abs(actual - expected).max() < TOLERANCE


@pytest.fixture(scope="module", params=["mask", "split"])
def edit_plus(request, tmp_path_factory) -> QwenImageEditPlusPipeline:
    """The pipeline of Qwen-Image-Edit-2509 and later, which takes several images."""
    return tiny_edit_plus(tmp_path_factory.mktemp("tiny"), request.param)


def tiny_edit_plus(directory, text_padding: str) -> QwenImageEditPlusPipeline:
    """The tiny Plus pipeline, its vision processor letting ~384x384 prompt images through
    unscaled (the recipe's bounds would shrink them, and a wrong prompt size with them)."""
    pipeline = tiny(QwenImageEditPlusPipeline, "edit-plus", directory, text_padding)
    pipeline.processor.image_processor.size = {
        "shortest_edge": 56 * 56,
        "longest_edge": 448 * 448,
    }
    return pipeline


def pictures(*sizes: tuple[int, int], seed: int = 0) -> tuple[Image.Image, ...]:
    """Random RGB images of the given (width, height)."""
    rng = np.random.default_rng(seed)
    return tuple(
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        for width, height in sizes
    )


def test_edit_equals_the_edit_pipeline(edit):
    job = Job("make it blue", " ", (3,), 64, 48, 2, 4.0, images=pictures((96, 64)))
    expected = run_baseline(edit, job)
    (actual,) = generate(edit, [job], output_type="np")
    assert np.abs(actual - expected).max() < TOLERANCE


@pytest.mark.parametrize(
    "sizes", [[(96, 64)], [(96, 64), (48, 80)]], ids=["one-image", "two-images"]
)
def test_edit_plus_equals_the_edit_plus_pipeline(edit_plus, sizes):
    """Each image conditions the VAE at ~1024x1024 and the text encoder at ~384x384, as
    ``Picture 1``, ``Picture 2``: the images of the pipeline call on the same seed."""
    job = Job("put the two together", " ", (3,), 64, 48, 2, 4.0, images=pictures(*sizes))
    expected = run_baseline(edit_plus, job)
    (actual,) = generate(edit_plus, [job], output_type="np")
    assert np.abs(actual - expected).max() < TOLERANCE


def test_a_batch_of_edits_from_two_images_equals_each_edit_alone(edit_plus):
    """Requests whose input images have the same sizes share a batch: different pictures and
    prompts (texts of different lengths), each image as its request alone would have it."""
    jobs = [
        Job(
            "the cat of picture 1 on the sofa of picture 2",
            " ",
            (3, 4),
            64,
            48,
            2,
            4.0,
            images=pictures((96, 64), (48, 80), seed=1),
        ),
        Job("swap them", " ", (5,), 64, 48, 2, 4.0, images=pictures((96, 64), (48, 80), seed=2)),
    ]
    assert jobs[0].batch_key == jobs[1].batch_key
    batched = generate(edit_plus, jobs, output_type="np")
    for job, images in zip(jobs, batched, strict=True):
        assert np.abs(images - generate(edit_plus, [job], output_type="np")[0]).max() < TOLERANCE


LONG_PROMPT = " ".join(f"paint cube {n} blue" for n in range(300))  # far over 512 tokens


def check_long_prompt(pipeline: QwenImageEditPipeline | QwenImageEditPlusPipeline) -> None:
    """As a generation's: what follows a prompt's first 512 tokens changes nothing (the
    edit pipelines keep every token, which overflowed the transformer's text positions), and
    the request batched equals the request alone."""
    job = Job(LONG_PROMPT, " ", (3,), 64, 48, 2, 4.0, images=pictures((96, 64)))
    other = Job("make it red", " ", (5,), 64, 48, 2, 4.0, images=pictures((96, 64), seed=1))
    (alone,) = generate(pipeline, [job], output_type="np")
    batched, _ = generate(pipeline, [job, other], output_type="np")
    longer = replace(job, prompt=LONG_PROMPT + " and the sphere green")
    (longer_alone,) = generate(pipeline, [longer], output_type="np")
    assert np.abs(batched - alone).max() < TOLERANCE
    assert np.abs(longer_alone - alone).max() < TOLERANCE


def test_an_edit_prompt_is_cut_after_exactly_512_tokens(edit):
    """Where the cut falls, as diffusers cuts a generation's prompt (the first 512 tokens of
    the prompt and the template's closing tokens): prompts that differ from their 513th
    token on give the same image, and prompts that differ at their 512th do not."""
    tokenizer = edit.processor.tokenizer
    prompt = "a" * 600
    assert len(tokenizer(prompt)["input_ids"]) == 600  # the tiny tokenizer: a token a byte
    job = Job(prompt, " ", (3,), 64, 48, 2, 4.0, images=pictures((96, 64)))
    (image,) = generate(edit, [job], output_type="np")
    for differs_at, same in ((512, True), (511, False)):
        other = replace(job, prompt=prompt[:differs_at] + "b" + prompt[differs_at + 1 :])
        (other_image,) = generate(edit, [other], output_type="np")
        assert (np.abs(other_image - image).max() < TOLERANCE) == same, differs_at


def test_a_long_edit_prompt_keeps_its_first_512_tokens_alone_and_batched(edit):
    check_long_prompt(edit)


def test_a_long_edit_plus_prompt_keeps_its_first_512_tokens_alone_and_batched(edit_plus):
    check_long_prompt(edit_plus)


def test_a_zero_cond_t_transformer_equals_the_edit_plus_pipeline(tmp_path):
    """Qwen-Image-Edit-2511's transformer modulates the input images' tokens as at t = 0
    (``zero_cond_t``): the engine's batched CFG and split attention keep its images."""
    pipeline = tiny_edit_plus(tmp_path, "split")
    plain = pipeline.transformer
    zero_cond_t = QwenImageTransformer2DModel.from_config({**plain.config, "zero_cond_t": True})
    zero_cond_t.load_state_dict(plain.state_dict())
    pipeline.transformer = zero_cond_t
    attention.install(zero_cond_t)
    modulation.install(zero_cond_t)  # leaves this transformer's modulation as diffusers' own
    assert not modulation.installed(zero_cond_t)

    job = Job(
        "put the two together", " ", (3,), 64, 48, 2, 4.0, images=pictures((96, 64), (64, 64))
    )
    expected = run_baseline(pipeline, job)
    (actual,) = generate(pipeline, [job], output_type="np")
    assert np.abs(actual - expected).max() < TOLERANCE
    pipeline.transformer = plain
    (without,) = generate(pipeline, [job], output_type="np")
    assert np.abs(without - expected).max() > 100 * TOLERANCE  # zero_cond_t changes the images


def transparent_box(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """The edit area of an OpenAI mask of ``size`` that is fully transparent in ``box``
    (left, top, right, bottom): white there, black elsewhere."""
    area = Image.new("L", size, 0)
    area.paste(255, box)
    return area


@pytest.fixture(scope="module")
def edit_split(tmp_path_factory) -> QwenImageEditPipeline:
    return tiny(QwenImageEditPipeline, "edit", tmp_path_factory.mktemp("tiny"), "split")


def test_a_masked_edit_equals_the_inpaint_pipeline(edit_split):
    """At full strength, with the pipeline's sampled image latents and per-step blending; the
    output has the image's condition size (1248x832 for 96x64), as the pipeline's has."""
    (image,) = pictures((96, 64))
    job = Job(
        "a blue hat",
        " ",
        (3,),
        1248,
        832,
        2,
        4.0,
        images=(image,),
        mask=transparent_box(image.size, (20, 10, 70, 40)),
    )
    expected = run_baseline(QwenImageEditInpaintPipeline(**edit_split.components), job)
    (actual,) = generate(edit_split, [job], output_type="np")
    assert actual.shape == expected.shape == (1, 832, 1248, 3)
    assert np.abs(actual - expected).max() < TOLERANCE


def test_a_batch_of_masked_edits_equals_each_alone(edit_split):
    """Each output image draws its own image latents and noise: two images of one request and
    a request with another picture, prompt and mask, each as alone."""
    jobs = [
        Job(
            "a blue hat",
            " ",
            (3, 4),
            1248,
            832,
            2,
            4.0,
            images=pictures((96, 64), seed=1),
            mask=transparent_box((96, 64), (0, 0, 48, 64)),
        ),
        Job(
            "a red scarf on the left",
            " ",
            (5,),
            1248,
            832,
            2,
            4.0,
            images=pictures((96, 64), seed=2),
            mask=transparent_box((96, 64), (40, 20, 96, 64)),
        ),
    ]
    assert jobs[0].batch_key == jobs[1].batch_key
    batched = generate(edit_split, jobs, output_type="np")
    for job, images in zip(jobs, batched, strict=True):
        assert np.abs(images - generate(edit_split, [job], output_type="np")[0]).max() < TOLERANCE
    assert np.abs(batched[0][0] - batched[0][1]).max() > 100 * TOLERANCE  # seeds differ


def test_a_masked_edit_from_two_images_changes_only_its_area(edit_plus):
    """With a mask on the first of two images (the Plus pipeline has no inpaint pipeline to
    compare with), two prompts give the same latents outside the area and different ones
    inside. 96x64 becomes 1248x832, 78x52 tokens of 16x16 pixels: the mask's left half is
    token columns 0 to 38; the column next to the border is left out."""
    images = pictures((96, 64), (64, 64))
    mask = transparent_box((96, 64), (0, 0, 48, 64))
    latents = [
        generate(
            edit_plus,
            [Job(prompt, " ", (3,), 1248, 832, 2, 4.0, images, mask)],
            output_type="latent",
        )
        for prompt in ("a blue hat", "a storm at sea, in the style of an old oil painting")
    ]
    first, second = (job_latents[0][0].reshape(52, 78, -1) for job_latents in latents)
    assert torch.equal(first[:, 40:], second[:, 40:])
    assert (first[:, :38] - second[:, :38]).abs().amax(dim=-1).min() > 0


def test_a_masked_edit_needs_its_first_images_condition_size(edit_split):
    job = Job(
        "a hat",
        " ",
        (3,),
        64,
        48,
        2,
        4.0,
        images=pictures((96, 64)),
        mask=transparent_box((96, 64), (0, 0, 48, 64)),
    )
    with pytest.raises(ValueError, match="condition size"):
        generate(edit_split, [job], output_type="np")


def test_a_batch_of_requests_equals_each_request_alone(generation):
    """Prompts of different lengths and two images in one request: the case where diffusers'
    num_images_per_prompt misorders masks."""
    jobs = [
        Job("a lighthouse on a cliff at dusk, oil painting", "", (5, 6), 64, 64, 3, 4.0),
        Job("a cat", "", (9,), 64, 64, 3, 4.0),
        Job("a bowl of ramen", "blurry", (11,), 64, 64, 3, 4.0),
    ]
    batched = generate(generation, jobs, output_type="np")
    for job, images in zip(jobs, batched, strict=True):
        assert images.shape == (job.num_images, 64, 64, 3)
        for image, seed in zip(images, job.seeds, strict=True):
            single = Job(job.prompt, job.negative_prompt, (seed,), 64, 64, 3, 4.0)
            assert np.abs(image - run_baseline(generation, single)[0]).max() < TOLERANCE


def test_a_batch_encodes_each_prompt_once(generation, monkeypatch):
    """Four images sharing one negative prompt: three prompt encodings, not eight, and the
    same images as without the sharing (each request alone)."""
    jobs = [
        Job("a red cube", " ", (1, 2), 64, 64, 2, 4.0),
        Job("a cat", " ", (3,), 64, 64, 2, 4.0),
        Job("a red cube", " ", (4,), 64, 64, 2, 4.0),
    ]
    alone = [generate(generation, [job], output_type="np")[0] for job in jobs]

    prompts = []
    encode_prompt = generation.encode_prompt

    def counting_encode_prompt(prompt, **kwargs):
        prompts.append(prompt)
        return encode_prompt(prompt, **kwargs)

    monkeypatch.setattr(generation, "encode_prompt", counting_encode_prompt)
    batched = generate(generation, jobs, output_type="np")

    assert sorted(prompts) == [" ", "a cat", "a red cube"]
    for expected, actual in zip(alone, batched, strict=True):
        assert np.abs(actual - expected).max() < TOLERANCE


def test_the_modulation_is_computed_once_a_request(generation):
    """The engine runs each block's modulation layer once over all of a request's steps (its
    weights read once, not at each step); a plain pipeline call, outside the engine's loop,
    still runs it at each step. That both give the same images is the tests above."""
    assert modulation.installed(generation.transformer)
    blocks = generation.transformer.transformer_blocks
    rows_per_call = []
    hook = (
        blocks[0]
        .img_mod[1]
        .register_forward_hook(lambda module, args, output: rows_per_call.append(args[0].shape[0]))
    )
    job = Job("a red cube", " ", (1,), 64, 48, 3, 4.0)
    try:
        generate(generation, [job, Job("a cat", " ", (2,), 64, 48, 3, 4.0)], output_type="np")
        assert rows_per_call == [3]  # one row per step, for both requests and their CFG
        rows_per_call.clear()
        run_baseline(generation, job)
        assert rows_per_call == [1] * 6  # diffusers: 3 steps of two passes
    finally:
        hook.remove()
    assert all(block.img_mod.rows is None and block.txt_mod.rows is None for block in blocks)


def test_modulation_install_keeps_names_and_skips_other_modulations():
    """Parameter names stay (LoRAs and FP8 find the same layers); transformers whose
    modulation takes more than the step (Qwen-Image-Edit-2511's ``zero_cond_t``) keep
    diffusers' layers."""
    transformer = build_transformer()
    names = list(transformer.state_dict())
    modulation.install(transformer)
    assert isinstance(transformer.transformer_blocks[0].txt_mod, modulation.StepModulation)
    assert list(transformer.state_dict()) == names
    config = {key: value for key, value in transformer.config.items() if key[0] != "_"}
    with_condition_timestep = QwenImageTransformer2DModel(**{**config, "zero_cond_t": True})
    modulation.install(with_condition_timestep)
    assert not modulation.installed(with_condition_timestep)


def test_pil_output(generation):
    (images,) = generate(generation, [Job("a cat", "", (1, 2), 64, 32, 2, 4.0)])
    assert [image.size for image in images] == [(64, 32), (64, 32)]


@pytest.mark.parametrize(
    ("steps", "count", "expected"),
    [(50, 3, [11, 24, 37]), (50, 1, [24]), (6, 2, [1, 3]), (3, 3, [0, 1]), (2, 3, [0]), (1, 2, [])],
)
def test_previews_are_spread_over_the_run_before_its_last_step(steps, count, expected):
    assert preview_steps(steps, count) == expected


def test_previews_come_at_their_steps_and_leave_the_images(generation):
    """A request asking for two previews batched after one asking for none: it gets each of
    its images' previews after steps 2 and 4 of 6, numbered per image, each the preview it
    gets alone; the other gets none; and every final image is the one made without
    previews."""
    steps_done: list[int] = []
    received: list[tuple[int, int, int, Image.Image]] = []

    def on_partial(number: int, index: int, image: Image.Image) -> None:
        received.append((len(steps_done), number, index, image))

    asking = Job(
        "a lighthouse", "", (5, 6), 64, 32, 6, 4.0, partial_images=2, on_partial=on_partial
    )
    silent = Job("a cat", "blurry", (9,), 64, 32, 6, 4.0)
    with_previews = generate(
        generation, [silent, asking], output_type="np", on_step_end=steps_done.append
    )
    batched = list(received)
    assert [(step, number, index) for step, number, index, _ in batched] == [
        (1, 0, 0),
        (1, 1, 0),
        (3, 0, 1),
        (3, 1, 1),
    ]
    received.clear()
    generate(generation, [asking], output_type="np", on_step_end=steps_done.append)
    for (*_, in_batch), (*_, alone) in zip(batched, received, strict=True):
        difference = np.abs(np.asarray(in_batch, np.int16) - np.asarray(alone, np.int16))
        assert difference.max() <= 1  # float32 rounding in 8-bit pixels
    without = generate(generation, [silent, replace(asking, on_partial=None)], output_type="np")
    for previewed, plain in zip(with_previews, without, strict=True):
        assert np.array_equal(previewed, plain)


def test_a_preview_is_the_clean_image_its_step_points_to(generation, monkeypatch):
    """The preview after step 1 decodes x0 = x_t - sigma_t * v, from the step's input
    latents and the transformer's prediction (no CFG: the prediction is the transformer's)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module, args, kwargs, output) -> None:
        seen.append((kwargs["hidden_states"], output[0]))

    previews: list[Image.Image] = []
    job = Job("a lighthouse", None, (5,), 64, 32, 3, 4.0, partial_images=1)
    job = replace(job, on_partial=lambda number, index, image: previews.append(image))
    monkeypatch.setattr(denoise, "preview_steps", lambda steps, count: [0])
    hook = generation.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        generate(generation, [job])
    finally:
        hook.remove()
    noisy, velocity = seen[0]
    clean = noisy - generation.scheduler.sigmas[0] * velocity
    expected = denoise.decode(generation, clean, job, "pil")
    assert np.array_equal(np.asarray(previews[0]), np.asarray(expected))


@pytest.mark.parametrize("masked", [False, True], ids=["generation", "masked-edit"])
def test_a_preview_after_the_last_step_is_the_final_image(
    generation, edit_split, masked, monkeypatch
):
    """The preview is the clean image the step's prediction points to, x_t - sigma_t * v
    (outside a mask's area, the image's own latents): after the last step, whose next
    sigma is 0, that is the final image exactly. Earlier ones differ from it."""
    if masked:
        (image,) = pictures((96, 64))
        mask = transparent_box(image.size, (20, 10, 70, 40))
        pipeline, job = (
            edit_split,
            Job("a hat", " ", (3,), 1248, 832, 3, 4.0, images=(image,), mask=mask),
        )
    else:
        pipeline, job = generation, Job("a lighthouse", "", (5,), 64, 32, 3, 4.0)
    previews: list[Image.Image] = []
    job = replace(job, partial_images=2, on_partial=lambda n, i, image: previews.append(image))
    monkeypatch.setattr(denoise, "preview_steps", lambda steps, count: [0, steps - 1])
    ((final,),) = generate(pipeline, [job])
    early, last = (np.asarray(preview) for preview in previews)
    assert np.array_equal(last, np.asarray(final))
    assert not np.array_equal(early, np.asarray(final))


BATCHED_JOB = Job("a", "", (1,), 64, 64, 2, 4.0)


@pytest.mark.parametrize(
    "other",
    [
        replace(BATCHED_JOB, height=32),
        replace(BATCHED_JOB, num_inference_steps=3),
        replace(BATCHED_JOB, true_cfg_scale=2.5),
        replace(BATCHED_JOB, negative_prompt=None),  # no CFG: one pass a step
    ],
    ids=["size", "steps", "cfg-scale", "no-cfg"],
)
def test_jobs_that_differ_in_their_schedule_are_not_batched(generation, other):
    """One batch runs one schedule: requests that differ in size, steps or CFG get keys
    apart, which the engine never batches, and ``generate`` refuses them together."""
    assert replace(BATCHED_JOB, prompt="b", negative_prompt="c", seeds=(2, 3)).batch_key == (
        BATCHED_JOB.batch_key
    )
    assert other.batch_key != BATCHED_JOB.batch_key
    with pytest.raises(ValueError, match="must share size, steps, CFG"):
        generate(generation, [BATCHED_JOB, other])


def test_edits_batch_only_with_edits_of_alike_inputs():
    """An edit's input images set its condition tokens, and a mask its schedule."""
    edit = Job("a", " ", (1,), 64, 48, 2, 4.0, images=pictures((96, 64)))
    assert replace(edit, prompt="b", images=pictures((96, 64), seed=1)).batch_key == (
        edit.batch_key
    )
    assert replace(edit, images=pictures((48, 80))).batch_key != edit.batch_key
    assert replace(edit, images=pictures((96, 64), (96, 64))).batch_key != edit.batch_key
    masked = replace(edit, mask=Image.new("L", (96, 64)))
    assert masked.batch_key != edit.batch_key


def test_pil_output_equals_diffusers_postprocessing(generation):
    """The engine makes 8-bit pixels on the device; they must be diffusers' own, bit for bit."""
    job = Job("a red cube on a wooden table", " ", (5,), 64, 48, 2, 4.0)
    ((image,),) = generate(generation, [job])
    (array,) = generate(generation, [job], output_type="np")
    (expected,) = VaeImageProcessor.numpy_to_pil(array)
    assert np.array_equal(np.asarray(image), np.asarray(expected))

    # bf16, as on a GPU, with values on the rounding boundaries.
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pixels[0, 0, 0, :8] = torch.tensor([-1.0, 1.0, 0.0, 1 / 255, -1 / 255, 0.5, -0.5, 2.0])
    pixels = pixels.to(torch.bfloat16)
    processor = generation.image_processor
    (expected,) = processor.postprocess(pixels, output_type="pil")
    actual = _to_pil(processor.postprocess(pixels, output_type="pt"))
    assert np.array_equal(np.asarray(actual), np.asarray(expected))


def test_pad_text_masks_only_padding():
    short, long = torch.ones(2, 4), torch.ones(5, 4)
    padded, mask = pad_text([short, long])
    assert padded.shape == (2, 5, 4)
    assert padded[0, 2:].abs().sum() == 0
    assert mask.tolist() == [[True, True, False, False, False], [True] * 5]
    assert pad_text([long, long])[1] is None


def test_pad_text_rounds_up_to_a_multiple():
    short, long = torch.ones(2, 4), torch.ones(5, 4)
    padded, mask = pad_text([short, long], multiple=4)
    assert padded.shape == (2, 8, 4)
    assert padded[1, 5:].abs().sum() == 0
    assert mask.sum(dim=1).tolist() == [2, 5]
    assert pad_text([torch.ones(8, 4)] * 2, multiple=4)[1] is None  # already a multiple


@contextlib.contextmanager
def text_lengths_seen(pipeline: DiffusionPipeline) -> Iterator[list[int]]:
    """The text lengths that the pipeline's transformer is called with, as they come."""
    seen: list[int] = []
    hook = pipeline.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]),
        with_kwargs=True,
    )
    try:
        yield seen
    finally:
        hook.remove()


def generate_with_and_without_buckets(
    pipeline: DiffusionPipeline, jobs: list[Job]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The images of ``jobs`` as they are and with texts padded to multiples of 64 tokens;
    checks that the padding reached the transformer."""
    with text_lengths_seen(pipeline) as exact_lengths:
        exact = generate(pipeline, jobs, output_type="np")
    with text_lengths_seen(pipeline) as bucketed_lengths:
        bucketed = generate(pipeline, jobs, output_type="np", text_bucket=64)
    assert all(length % 64 for length in exact_lengths), exact_lengths  # a real check below
    assert bucketed_lengths and all(length % 64 == 0 for length in bucketed_lengths)
    return exact, bucketed


def test_text_buckets_keep_the_images(generation):
    """CUDA graphs pad every text to a multiple of 64 tokens (``text_bucket``): with the
    padding masked out, or skipped by split attention, the images stay the same."""
    jobs = [
        Job("a lighthouse on a cliff at dusk, oil painting", " ", (5,), 64, 64, 2, 4.0),
        Job("a cat", " ", (9, 10), 64, 64, 2, 4.0),
    ]
    exact, bucketed = generate_with_and_without_buckets(generation, jobs)
    for expected, actual in zip(exact, bucketed, strict=True):
        assert np.abs(actual - expected).max() < TOLERANCE
    (no_cfg,) = generate(generation, [Job("a cat", None, (3,), 64, 64, 2, 4.0)], text_bucket=64)
    assert len(no_cfg) == 1  # one text, padded on its own


def test_text_buckets_keep_the_edited_images(edit):
    """The edit's texts carry the input image's vision tokens: padded the same way."""
    job = Job("make it blue", " ", (3,), 64, 48, 2, 4.0, images=pictures((64, 48), seed=1))
    (exact,), (bucketed,) = generate_with_and_without_buckets(edit, [job])
    assert np.abs(bucketed - exact).max() < TOLERANCE


def test_split_padding_never_hands_a_mask_to_the_kernel(generation):
    """``_native_flash`` refuses masks: with the padding split it must not see one."""
    job = Job("a red cube on a wooden table", " ", (7,), 64, 48, 2, 4.0)
    refusing = AttentionBackends(masked="_native_flash", unmasked="native")
    if attention.installed(generation.transformer):
        (actual,) = generate(generation, [job], attention=refusing, output_type="np")
        assert np.abs(actual - run_baseline(generation, job)).max() < TOLERANCE
    else:
        with pytest.raises(ValueError, match=r"(?i)mask"):
            generate(generation, [job], attention=refusing, output_type="np")


def test_text_runs_group_consecutive_equal_lengths():
    assert attention.text_runs([5, 5, 3, 5]) == ((0, 2, 5), (2, 3, 3), (3, 4, 5))
    assert attention.text_runs([7]) == ((0, 1, 7),)


def test_compiled_rope_is_diffusers_complex_rope_in_real_numbers():
    """Compiled, the processor's RoPE computes diffusers' complex product in real numbers:
    Inductor has no kernels for complex numbers, and ran the complex product as an eager
    kernel of its own (``aten.view_as_complex``, then ``aten.mul``, in its generated code)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 3, 8, generator=generator)  # [batch, tokens, heads, head_dim]
    angles = torch.rand(10, 4, generator=generator) * 2 * torch.pi
    freqs = torch.polar(torch.ones_like(angles), angles)

    def rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        return attention._rope(x, freqs)

    actual, code = run_and_get_code(torch.compile(rope, fullgraph=True), x, freqs)
    assert torch.allclose(actual, apply_rotary_emb_qwen(x, freqs, use_real=False), atol=1e-6)
    generated = "\n".join(code)
    assert "aten.mul" not in generated and "view_as_complex" not in generated
    # Eager, it is diffusers' own complex product.
    assert torch.equal(attention._rope(x, freqs), apply_rotary_emb_qwen(x, freqs, use_real=False))


def test_padded_joint_attention_attends_each_sample_over_its_real_tokens():
    """Each sample's output equals plain attention over its own text and the image; the
    padded text positions are zero; text and image come back apart, each contiguous, so the
    output projections copy nothing. ``opcheck`` checks the op's registration (schema, fake
    shapes) as ``torch.compile`` relies on it."""
    generator = torch.Generator().manual_seed(0)
    lengths, padded, image_tokens = [5, 5, 2, 5, 3], 5, 6
    query, key, value = (  # [image, text] sequences
        torch.randn(len(lengths), image_tokens + padded, 2, 8, generator=generator)
        for _ in range(3)
    )
    text_lengths = torch.tensor(lengths)
    op = attention.padded_joint_attention
    image_out, text_out = op(query, key, value, text_lengths, image_tokens)
    assert text_out.is_contiguous() and image_out.is_contiguous()
    out = torch.cat([image_out, text_out], dim=1)

    for sample, length in enumerate(lengths):
        real = torch.arange(image_tokens + length)
        q, k, v = (x[sample : sample + 1, real].transpose(1, 2) for x in (query, key, value))
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)[0]
        assert torch.allclose(out[sample, real], expected, atol=1e-6)
        assert out[sample, image_tokens + length :].abs().sum() == 0
    for lengths_arg in (text_lengths, torch.tensor([padded] * len(lengths))):
        torch.library.opcheck(op, (query, key, value, lengths_arg, image_tokens))
    # One sample, nothing padded: the image output is the start of the kernel's own output.
    one = [x[:1] for x in (query, key, value)]
    torch.library.opcheck(op, (*one, torch.tensor([padded]), image_tokens))
    # One text length, padded (a text bucket): one call over the real tokens.
    short = torch.tensor([2] * len(lengths))
    image_out, text_out = op(query, key, value, short, image_tokens)
    real = slice(0, image_tokens + 2)
    q, k, v = (x[:, real].transpose(1, 2) for x in (query, key, value))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    assert torch.allclose(torch.cat([image_out, text_out[:, :2]], dim=1), expected, atol=1e-6)
    assert text_out[:, 2:].abs().sum() == 0 and text_out.shape[1] == padded
    torch.library.opcheck(op, (query, key, value, short, image_tokens))
    # Its kernels follow lengths read on the host: CUDA graphs must leave it out.
    registered = torch.ops.qwen_image_serve.padded_joint_attention.default
    assert torch.Tag.cudagraph_unsafe in registered.tags
