"""An explicit Qwen-Image denoising loop: true CFG in one batched forward, several requests at once.

diffusers' ``QwenImagePipeline`` and ``QwenImageEditPipeline`` run true classifier-free
guidance as two transformer passes per step, and their ``num_images_per_prompt`` misorders
masks when prompts differ in length. ``generate`` runs the same arithmetic differently:

- each prompt is encoded alone (as a single pipeline call encodes it) and repeated per image;
- the conditional and unconditional text of every image go through the transformer as one
  batch, the shorter embeddings zero-padded; attention skips the padding by running each
  group of equal text lengths on its own where ``predictors.attention`` is installed (as
  ``acceleration.apply`` does), else through diffusers' padding mask;
- the guided prediction is the pipeline's own norm-rescaled combination;
- timesteps are prepared once, and the step loop reads nothing back to the host;
- the blocks' modulation is computed for all steps at once where ``predictors.modulation`` is
  installed (as ``acceleration.apply`` does);
- a prompt that several images of a batch share (the default negative prompt, say) is
  encoded once;
- edits take one input image (``QwenImageEditPipeline``) or several
  (``QwenImageEditPlusPipeline``, Qwen-Image-Edit-2509 and later), prepared as each
  pipeline prepares them;
- an edit's prompt is cut to its first ``MAX_SEQUENCE_LENGTH`` tokens, as a generation's
  (diffusers' edit pipelines keep all, and a long one overflows the transformer's text
  positions);
- an edit with a mask repaints only the mask's area of its first image, as
  ``QwenImageEditInpaintPipeline`` does at full strength: after each step, the latents
  outside the area are the image's, noised to the next step's level;
- the VAE encodes edit images and decodes outputs with its convolutions as 2D ones
  (``predictors.vae``);
- a job may ask for previews of its images while they are made (``Job.partial_images``):
  after a few steps spread over the run, the VAE decodes the clean image that the step's
  prediction points to, and ``Job.on_partial`` receives it. The final images do not change.

It imports neither kserve nor the server, so the benchmark harness runs it on a bare GPU host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage, DiffusionPipeline, QwenImageEditPlusPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.attention_dispatch import attention_backend
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE as SEVERAL_IMAGES_PROMPT_AREA,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from predictors import attention as padding_free
from predictors import modulation
from predictors.vae import decode_single_frame, encode_single_frame, single_frame_posterior

logger = logging.getLogger(__name__)

# The edit pipelines condition on each input image resized to about this many pixels.
# QwenImageEditPlusPipeline's text encoder reads them smaller (SEVERAL_IMAGES_PROMPT_AREA).
EDIT_CONDITION_AREA = 1024 * 1024
# QwenImagePipeline's default text length limit: the first 512 tokens of the prompt followed
# by the template's closing tokens are kept (a long prompt loses its closing tokens). The edit
# pipelines keep all; the engine cuts their prompts to the same length, after their image
# tokens (``_prompt_overflow``).
MAX_SEQUENCE_LENGTH = 512
# The inpaint pipelines' mask processor: grayscale, in [0, 1], binarised at 0.5. (Its VAE
# scale factor only serves to pick a size when none is given; the engine always gives one.)
EDIT_AREA_PROCESSOR = VaeImageProcessor(
    do_normalize=False, do_binarize=True, do_convert_grayscale=True
)


def edit_condition_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the input image's aspect ratio at the edit pipelines' ~1024x1024
    area: what the VAE's condition image is resized to, and (for the last input image) the
    default output size."""
    width, height, _ = calculate_dimensions(EDIT_CONDITION_AREA, image.width / image.height)
    return width, height


def takes_several_images(pipeline: DiffusionPipeline) -> bool:
    """Whether the pipeline edits from several input images: ``QwenImageEditPlusPipeline``
    (Qwen-Image-Edit-2509 and later) does, ``QwenImageEditPipeline`` takes one."""
    return isinstance(pipeline, QwenImageEditPlusPipeline)


def prompt_image_size(pipeline: DiffusionPipeline, image: Image.Image) -> tuple[int, int]:
    """(width, height) an input image is resized to for the pipeline's text encoder: the
    condition size, or ~384x384 for a pipeline that takes several images."""
    if not takes_several_images(pipeline):
        return edit_condition_size(image)
    width, height, _ = calculate_dimensions(SEVERAL_IMAGES_PROMPT_AREA, image.width / image.height)
    return width, height


# Called on the worker thread with (image number within the job, preview number, image).
PartialCallback = Callable[[int, int, Image.Image], None]


@dataclass(frozen=True)
class Job:
    """One request's share of a batch: its prompts, seeds, size and schedule.

    Image ``i`` starts from the noise of ``seeds[i]``. ``images`` are the edit's input
    images (none for text-to-image). ``mask`` is the area of ``images[0]`` to repaint, as
    diffusers' inpaint pipelines take it: white is repainted, black kept; a masked job's
    output has ``images[0]``'s condition size. True CFG runs when ``true_cfg_scale > 1`` and
    a negative prompt is given, as in diffusers. ``partial_images`` previews of each image
    go to ``on_partial`` (``preview_steps``); jobs that differ in them still share a batch.
    """

    prompt: str
    negative_prompt: str | None
    seeds: tuple[int, ...]
    width: int
    height: int
    num_inference_steps: int
    true_cfg_scale: float
    images: tuple[Image.Image, ...] = field(default=(), repr=False)
    mask: Image.Image | None = field(default=None, repr=False)
    partial_images: int = 0
    on_partial: PartialCallback | None = field(default=None, repr=False, compare=False)

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def do_true_cfg(self) -> bool:
        return self.true_cfg_scale > 1 and self.negative_prompt is not None

    @cached_property  # read by every batch_key comparison while a batch is gathered
    def condition_sizes(self) -> tuple[tuple[int, int], ...]:
        """(width, height) the edit pipelines resize each input image to for the VAE."""
        return tuple(edit_condition_size(image) for image in self.images)

    @property
    def batch_key(self) -> Hashable:
        """Jobs with equal keys can share a transformer batch."""
        return (
            self.width,
            self.height,
            self.num_inference_steps,
            self.true_cfg_scale,
            self.do_true_cfg,
            self.condition_sizes,
            self.mask is not None,
        )


@dataclass(frozen=True)
class AttentionBackends:
    """diffusers attention backends: one for batches whose texts need a padding mask, one for
    batches that need none (where mask-refusing kernels such as flash attention can run)."""

    masked: str = "native"
    unmasked: str = "native"


@dataclass
class Conditioning:
    """What the transformer sees of one job besides the noise."""

    text: torch.Tensor  # [text_len, dim]
    negative_text: torch.Tensor | None  # [negative_len, dim]
    # [condition_tokens, channels] of the edit's images, but a masked edit's first, which is
    # `canvas`; None for text-to-image and for a masked edit of one image.
    image_latents: torch.Tensor | None
    # A masked edit's first image, as a VAE latent distribution that each output image
    # samples with its own generator, as QwenImageEditInpaintPipeline does.
    canvas: DiagonalGaussianDistribution | None = None
    edit_area: torch.Tensor | None = None  # [tokens, channels] of 0 (keep) and 1 (repaint)


StepCallback = Callable[[int], None]


def generate(
    pipeline: DiffusionPipeline,
    jobs: Sequence[Job],
    *,
    attention: AttentionBackends | None = None,
    output_type: str = "pil",
    on_step_end: StepCallback | None = None,
    text_bucket: int = 1,
) -> list[list[Image.Image] | np.ndarray]:
    """Denoise every image of ``jobs`` in one batch; the images (or arrays) of each job.

    All jobs must share a ``batch_key``. ``output_type`` is the pipeline's: ``pil``, ``np``
    or ``latent``. ``on_step_end(i)`` is called after step ``i`` is queued on the device.
    ``text_bucket``: the texts are zero-padded to a multiple of this many tokens, so that
    the transformer sees few distinct shapes (CUDA graphs) and enough rows (FP8's kernels);
    the padding is masked out.
    """
    if len({job.batch_key for job in jobs}) != 1:
        raise ValueError("the jobs of one batch must share size, steps, CFG and input image sizes")
    first = jobs[0]
    if first.mask is not None and first.condition_sizes[0] != (first.width, first.height):
        raise ValueError("a masked edit's output must have its first image's condition size")
    device = pipeline._execution_device
    dtype = pipeline.text_encoder.dtype
    transformer = pipeline.transformer
    latent_size = _latent_size(pipeline, first)

    with torch.inference_mode():
        text_cache: dict[str, torch.Tensor] = {}
        conditionings = [condition(pipeline, job, device, dtype, text_cache) for job in jobs]
        per_image = [c for job, c in zip(jobs, conditionings, strict=True) for _ in job.seeds]
        seeds = [seed for job in jobs for seed in job.seeds]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        canvas = edit_area = None
        if first.mask is not None:
            # Drawn before the noise, from the same generator, as the inpaint pipeline does.
            draws = zip(per_image, generators, strict=True)
            canvas = torch.stack([_sample_latents(pipeline, c.canvas, g) for c, g in draws])
            edit_area = torch.stack([c.edit_area for c in per_image])
        noise = torch.cat([_noise(pipeline, g, latent_size, device, dtype) for g in generators])
        image_latents = canvas
        if per_image[0].image_latents is not None:
            image_latents = torch.stack([c.image_latents for c in per_image])
            if canvas is not None:
                image_latents = torch.cat([canvas, image_latents], dim=1)

        texts = [c.text for c in per_image]
        if first.do_true_cfg:
            texts += [c.negative_text for c in per_image]
        text, text_mask = pad_text(texts, text_bucket)
        attention_kwargs = None
        if padding_free.installed(transformer):
            # The lengths replace the mask. A CPU tensor: the attention op reads it on the host.
            attention_kwargs = {"text_lengths": torch.tensor([t.shape[0] for t in texts])}
            text_mask = None
        copies = 2 if first.do_true_cfg else 1
        img_shapes = [_img_shapes(pipeline, first, latent_size)] * (copies * len(seeds))

        timesteps = _timesteps(pipeline, first.num_inference_steps, noise.shape[1], device)
        latents = noise
        if canvas is not None:
            sigmas = pipeline.scheduler.sigmas.to(device, dtype)  # the last one is 0
            latents = _noised(canvas, noise, sigmas[0])
            kept_area = 1 - edit_area
        # The pipeline's `t.expand(batch).to(dtype) / 1000`, for every step at once.
        model_timesteps = timesteps.to(dtype) / 1000
        attention = attention or AttentionBackends()
        backend = attention.unmasked if text_mask is None else attention.masked
        previews = _previews(jobs, first.num_inference_steps)
        if previews:
            preview_sigmas = pipeline.scheduler.sigmas.to(device, torch.float32)

        pipeline.scheduler.set_begin_index(0)
        try:
            with (
                attention_backend(backend),
                modulation.precomputed(transformer, model_timesteps) as select_step,
            ):
                for i, t in enumerate(timesteps):
                    select_step(i)
                    model_input = latents
                    if image_latents is not None:
                        model_input = torch.cat([latents, image_latents], dim=1)
                    if copies == 2:
                        model_input = torch.cat([model_input, model_input])
                    with transformer.cache_context("batch"):
                        prediction = transformer(
                            hidden_states=model_input,
                            timestep=model_timesteps[i].expand(model_input.shape[0]),
                            encoder_hidden_states=text,
                            encoder_hidden_states_mask=text_mask,
                            img_shapes=img_shapes,
                            attention_kwargs=attention_kwargs,
                            return_dict=False,
                        )[0]
                    prediction = prediction[:, : latents.shape[1]]
                    if copies == 2:
                        prediction = guide(*prediction.chunk(2), first.true_cfg_scale)
                    noisy = latents
                    latents = pipeline.scheduler.step(prediction, t, latents, return_dict=False)[0]
                    if canvas is not None:
                        # Outside the edit area: the canvas at the next step's noise level
                        # (the canvas itself after the last step, whose next sigma is 0).
                        kept = _noised(canvas, noise, sigmas[i + 1])
                        latents = kept_area * kept + edit_area * latents
                    for row, job, number, index in previews.get(i, ()):
                        # The flow's clean end: x0 = x_t - sigma_t * v.
                        clean = noisy[row] - preview_sigmas[i] * prediction[row]
                        if canvas is not None:
                            clean = kept_area[row] * canvas[row] + edit_area[row] * clean
                        job.on_partial(number, index, decode(pipeline, clean[None], first, "pil"))
                    if on_step_end is not None:
                        on_step_end(i)
        finally:
            pipeline.maybe_free_model_hooks()  # resets cache hooks, as the pipeline does

        images = [
            decode(pipeline, latents[i : i + 1], first, output_type) for i in range(len(seeds))
        ]
    return _split(images, jobs, output_type)


def preview_steps(num_inference_steps: int, count: int) -> list[int]:
    """The steps after which a job's ``count`` previews are made: spread evenly over the run
    and before its last step, whose image is the final one (fewer when steps are few)."""
    if num_inference_steps < 2:
        return []
    last = num_inference_steps - 2
    spread = num_inference_steps / (count + 1)
    return sorted({min(last, max(0, round((n + 1) * spread) - 1)) for n in range(count)})


def _previews(
    jobs: Sequence[Job], num_inference_steps: int
) -> dict[int, list[tuple[int, Job, int, int]]]:
    """By step: the batch rows to preview then, each with its job, its image number within
    the job and the preview's number."""
    by_step: dict[int, list[tuple[int, Job, int, int]]] = {}
    row = 0
    for job in jobs:
        steps = preview_steps(num_inference_steps, job.partial_images) if job.on_partial else []
        for number in range(job.num_images):
            for index, step in enumerate(steps):
                by_step.setdefault(step, []).append((row + number, job, number, index))
        row += job.num_images
    return by_step


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG: the guided prediction rescaled to the conditional one's norm."""
    combined = uncond + scale * (cond - uncond)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    combined_norm = torch.norm(combined, dim=-1, keepdim=True)
    return combined * (cond_norm / combined_norm)


def pad_text(
    texts: Sequence[torch.Tensor], multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack ``[len, dim]`` embeddings, zero-padded to the longest rounded up to a
    ``multiple`` of tokens, with a boolean mask of the real tokens; ``None`` when nothing was
    padded (diffusers drops all-true masks too)."""
    padded_length = padded_text_length(max(text.shape[0] for text in texts), multiple)
    padded = torch.stack([F.pad(text, (0, 0, 0, padded_length - text.shape[0])) for text in texts])
    if all(text.shape[0] == padded_length for text in texts):
        return padded, None
    lengths = torch.tensor([text.shape[0] for text in texts], device=padded.device)
    mask = torch.arange(padded_length, device=padded.device)[None, :] < lengths[:, None]
    return padded, mask


def padded_text_length(longest: int, multiple: int = 1) -> int:
    """The length a batch's texts are padded to: the longest, rounded up to a multiple."""
    return -(-longest // multiple) * multiple


def decode(
    pipeline: DiffusionPipeline, latents: torch.Tensor, job: Job, output_type: str
) -> Image.Image | np.ndarray | torch.Tensor:
    """One image from its packed latents [1, tokens, channels], as the pipelines decode it,
    with the VAE's convolutions as 2D ones (``predictors.vae``). A batch's images are decoded
    one by one, so that each equals its single run bit for bit (eight 512x512 images per VAE
    call saved 4 ms an image on an H100 and changed pixels)."""
    if output_type == "latent":
        return latents[0]
    vae = pipeline.vae
    latents = pipeline._unpack_latents(latents, job.height, job.width, pipeline.vae_scale_factor)
    latents = latents.to(vae.dtype)
    mean, std = _latent_statistics(vae, latents)
    latents = latents / (1.0 / std) + mean  # the pipeline's arithmetic, to the bit
    image = decode_single_frame(vae, latents)[:, :, 0]
    if output_type == "pil":
        return _to_pil(pipeline.image_processor.postprocess(image, output_type="pt"))
    return pipeline.image_processor.postprocess(image, output_type=output_type)[0]


def _latent_statistics(
    vae: AutoencoderKLQwenImage, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent mean and standard deviation, to broadcast over ``like``."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    return tuple(
        torch.tensor(values).view(shape).to(like.device, like.dtype)
        for values in (vae.config.latents_mean, vae.config.latents_std)
    )


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    """diffusers' conversion of one ``[1, 3, H, W]`` image in [0, 1] to PIL, with the
    arithmetic left on the image's device: only the 8-bit pixels cross to the host."""
    pixels = (pixels.float() * 255).round().to(torch.uint8)
    return Image.fromarray(pixels[0].permute(1, 2, 0).cpu().numpy())


def condition(
    pipeline: DiffusionPipeline,
    job: Job,
    device: torch.device,
    dtype: torch.dtype,
    text_cache: dict[str, torch.Tensor] | None = None,
) -> Conditioning:
    """Encode a job's prompts (and edit images) exactly as a single pipeline call does.

    ``text_cache`` holds the embeddings of prompts already encoded without an image; this
    call reads and fills it (an edit's prompts depend on its images, so they are not cached).
    """
    prompt_images = image_latents = canvas = edit_area = None
    if job.images:
        processor = pipeline.image_processor
        prompt_images = [
            processor.resize(image, *reversed(prompt_image_size(pipeline, image)))
            for image in job.images
        ]
        if not takes_several_images(pipeline):
            (prompt_images,) = prompt_images  # the pipeline's prompt template has one image
        pixels = [
            _pixels(pipeline, image, size, device, dtype)
            for image, size in zip(job.images, job.condition_sizes, strict=True)
        ]
        if job.mask is not None:
            canvas = single_frame_posterior(pipeline.vae, pixels.pop(0))
            edit_area = _edit_area(pipeline, job, device, dtype)
        if pixels:
            image_latents = torch.cat(
                [_normalized(pipeline, encode_single_frame(pipeline.vae, p)) for p in pixels]
            )

    cacheable = prompt_images is None and text_cache is not None

    def encode(prompt: str) -> torch.Tensor:
        if cacheable and prompt in text_cache:
            return text_cache[prompt]
        extra = {} if prompt_images is None else {"image": prompt_images}
        embeds, _ = pipeline.encode_prompt(
            prompt=prompt, device=device, max_sequence_length=MAX_SEQUENCE_LENGTH, **extra
        )
        text = embeds[0]  # a single prompt has no padding
        if prompt_images is not None:
            text = text[: text.shape[0] - _prompt_overflow(pipeline, prompt)]
        if cacheable:
            text_cache[prompt] = text
        return text

    negative = encode(job.negative_prompt) if job.do_true_cfg else None
    return Conditioning(encode(job.prompt), negative, image_latents, canvas, edit_area)


def _prompt_overflow(pipeline: DiffusionPipeline, prompt: str) -> int:
    """How many tokens of an edit's text embeddings ``QwenImagePipeline`` would not keep: it
    keeps the first ``MAX_SEQUENCE_LENGTH`` tokens of the prompt and the template's closing
    tokens, where the edit pipelines keep them all, after the image's tokens. The text encoder
    is causal, so the tokens before the cut come out as if the text ended there. Special
    tokens surround the prompt in the template, so it is tokenized as it is alone."""
    text = prompt + pipeline.prompt_template_encode.split("{}", 1)[1]
    if len(text.encode()) <= MAX_SEQUENCE_LENGTH:  # a byte-level token is a byte or more
        return 0
    tokens = len(pipeline.processor.tokenizer(text)["input_ids"])
    return max(0, tokens - MAX_SEQUENCE_LENGTH)


def _pixels(
    pipeline: DiffusionPipeline,
    image: Image.Image,
    size: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One input image resized to ``size`` (width, height), as the VAE takes it:
    [1, 3, 1, height, width] in [-1, 1]."""
    width, height = size
    pixels = pipeline.image_processor.preprocess(image, height, width).unsqueeze(2)
    return pixels.to(device, dtype)


def _normalized(pipeline: DiffusionPipeline, encoded: torch.Tensor) -> torch.Tensor:
    """VAE latents [1, z_dim, 1, h, w] normalised and packed: [tokens, channels]."""
    mean, std = _latent_statistics(pipeline.vae, encoded)
    encoded = (encoded - mean) / std
    channels = pipeline.transformer.config.in_channels // 4
    return pipeline._pack_latents(encoded, 1, channels, *encoded.shape[3:])[0]


def _sample_latents(
    pipeline: DiffusionPipeline, canvas: DiagonalGaussianDistribution, generator: torch.Generator
) -> torch.Tensor:
    """One draw of a masked edit's first image from its VAE latent distribution, normalised
    and packed: [tokens, channels]."""
    return _normalized(pipeline, canvas.sample(generator))


def _noised(canvas: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The canvas at noise level ``sigma``: the flow-matching scheduler's ``scale_noise``."""
    return sigma * noise + (1.0 - sigma) * canvas


def _edit_area(
    pipeline: DiffusionPipeline, job: Job, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """A masked job's area to repaint, as the inpaint pipelines make it: the mask resized to
    the output, binarised, taken to the latents' size (nearest) and packed for every
    channel: [tokens, channels] of 0 and 1."""
    area = EDIT_AREA_PROCESSOR.preprocess(job.mask, job.height, job.width)
    latent_size = _latent_size(pipeline, job)
    area = F.interpolate(area, size=latent_size).to(device, dtype)
    channels = pipeline.transformer.config.in_channels // 4
    return pipeline._pack_latents(area.repeat(1, channels, 1, 1), 1, channels, *latent_size)[0]


def _latent_size(pipeline: DiffusionPipeline, job: Job) -> tuple[int, int]:
    """(height, width) of a job's output latents, before packing."""
    factor = pipeline.vae_scale_factor * 2
    return 2 * (job.height // factor), 2 * (job.width // factor)


def _noise(
    pipeline: DiffusionPipeline,
    generator: torch.Generator,
    latent_size: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The packed starting noise of one image, drawn on the CPU by ``generator`` (seeded
    with the image's seed), so any device gets the same."""
    channels = pipeline.transformer.config.in_channels // 4
    shape = (1, 1, channels, *latent_size)
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    return pipeline._pack_latents(noise, 1, channels, *latent_size)


def _img_shapes(
    pipeline: DiffusionPipeline, job: Job, latent_size: tuple[int, int]
) -> list[tuple[int, int, int]]:
    """The transformer's RoPE layout of one sample: the output image, then each input image."""
    factor = pipeline.vae_scale_factor * 2
    return [
        (1, latent_size[0] // 2, latent_size[1] // 2),
        *((1, height // factor, width // factor) for width, height in job.condition_sizes),
    ]


def _timesteps(
    pipeline: DiffusionPipeline, steps: int, image_seq_len: int, device: torch.device
) -> torch.Tensor:
    """The pipeline's schedule: linear sigmas, shifted for the image's token count."""
    config = pipeline.scheduler.config
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / steps, steps)
    timesteps, _ = retrieve_timesteps(pipeline.scheduler, steps, device, sigmas=sigmas, mu=mu)
    return timesteps


def _split(
    images: list, jobs: Sequence[Job], output_type: str
) -> list[list[Image.Image] | np.ndarray]:
    """Regroup a flat list of images by job."""
    grouped, start = [], 0
    for job in jobs:
        part = images[start : start + job.num_images]
        grouped.append(np.stack(part) if output_type == "np" else part)
        start += job.num_images
    return grouped
