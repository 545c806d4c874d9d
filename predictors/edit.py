"""The editing predictor: ``QwenImageEditPipeline`` or ``QwenImageEditPlusPipeline`` behind
KServe v2."""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from PIL import Image

from predictors.contract import (
    EDIT_DEFAULTS,
    EDIT_MODEL_NAME,
    IMAGE,
    MASK,
    ContractError,
    ImageRequest,
)
from predictors.denoise import Job, edit_condition_size, prompt_image_size, takes_several_images
from predictors.images import decode_edit_area, decode_image, raise_decoder_pixel_limit
from predictors.model import PredictorOptions, QwenImageModel
from predictors.server import serve

# What the edit pipelines take of an input, once resized for their condition and their
# vision encoder: sides are multiples of 32 (diffusers' ``calculate_dimensions``: less is 0),
# and Qwen2.5-VL's image processor refuses aspect ratios over 200:1.
CONDITION_MIN_SIDE = 32
CONDITION_MAX_ASPECT = 200


class QwenImageEditModel(QwenImageModel):
    """Edits input images as a prompt describes: one with Qwen-Image-Edit
    (``QwenImageEditPipeline``), one or several with Qwen-Image-Edit-2509 and later
    (``QwenImageEditPlusPipeline``)."""

    pipeline_classes = (QwenImageEditPipeline, QwenImageEditPlusPipeline)
    tiny_kind = "edit"
    defaults = EDIT_DEFAULTS
    default_name = EDIT_MODEL_NAME
    location_env = "QWEN_IMAGE_EDIT_LOCATION"
    needs_image = True

    def __init__(self, name: str, options: PredictorOptions):
        super().__init__(name, options)
        raise_decoder_pixel_limit(options.limits.max_input_pixels)

    def prepare(self, request: ImageRequest) -> Job:
        """Decode the input images (and mask); without an explicit size, the output keeps the
        last image's aspect ratio at the pipelines' ~1024x1024 area, which must fit the size
        limits. A mask marks the area to repaint on the first image, whose aspect ratio the
        output then keeps: an explicit size may only repeat it.

        Whatever the output size, the pipeline resizes each input for its condition and its
        vision encoder, which take no side under 32 pixels and no aspect ratio over 200:1: a
        more elongated input is refused on both paths.
        """
        count = len(request.images)
        if count > 1 and not takes_several_images(self.pipeline):
            raise ContractError(
                IMAGE,
                f"'image' holds {count} images, and this model "
                f"({type(self.pipeline).__name__}) edits one: send one, or serve "
                "Qwen-Image-Edit-2509 or later to edit from several",
            )
        labels = (
            ["'image'"] if count == 1 else [f"'image' {n} of {count}" for n in range(1, count + 1)]
        )
        images = []
        for data, label in zip(request.images, labels, strict=True):
            image = decode_image(data, self.options.limits.max_input_pixels, label)
            self.check_aspect_ratio(image, label)
            images.append(image)
        mask = None
        if request.mask is not None:
            mask = decode_edit_area(
                request.mask, images[0], labels[0], self.options.limits.max_input_pixels
            )
        # A masked edit repaints part of its first image; others follow the last image.
        framing = 0 if mask is not None else -1
        width, height = edit_condition_size(images[framing])
        explicit_size = (request.width, request.height)
        if mask is not None and request.width is not None and explicit_size != (width, height):
            raise ContractError(
                MASK,
                f"'mask' sets the output size to {width}x{height} (the aspect ratio of "
                f"{labels[0]} at ~1024x1024): leave the size out or ask for that one, not "
                f"{request.width}x{request.height}",
            )
        if request.width is not None:
            return self.job(request, request.width, request.height, tuple(images), mask)
        limits = self.options.limits
        if not (limits.min_size <= min(width, height) and max(width, height) <= limits.max_size):
            raise ContractError(
                IMAGE,
                f"{labels[framing]} has an aspect ratio of {images[framing].width}:"
                f"{images[framing].height}, which would give a {width}x{height} output, "
                f"outside {limits.min_size}-{limits.max_size}",
            )
        return self.job(request, width, height, tuple(images), mask)

    def check_aspect_ratio(self, image: Image.Image, label: str) -> None:
        """Refuse an input that the pipeline would resize to a side under 32 pixels or an
        aspect ratio over 200:1."""
        for width, height in (edit_condition_size(image), prompt_image_size(self.pipeline, image)):
            shortest, longest = sorted((width, height))
            if shortest < CONDITION_MIN_SIDE or longest > CONDITION_MAX_ASPECT * shortest:
                raise ContractError(
                    IMAGE,
                    f"{label} has an aspect ratio of {image.width}:{image.height}, more "
                    f"elongated than the edit pipeline takes (it would resize it to "
                    f"{width}x{height})",
                )


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``qwen-image-edit-predictor``."""
    serve(QwenImageEditModel, argv)


if __name__ == "__main__":
    main()
