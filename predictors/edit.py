"""The editing predictor: ``QwenImageEditPipeline`` behind KServe v2."""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import QwenImageEditPipeline

from predictors.contract import EDIT_DEFAULTS, EDIT_MODEL_NAME, IMAGE, ContractError, ImageRequest
from predictors.denoise import Job, edit_condition_size
from predictors.images import decode_image, raise_decoder_pixel_limit
from predictors.model import PredictorOptions, QwenImageModel
from predictors.server import serve

# What the edit pipeline takes of the input, once resized for its condition: sides are
# multiples of 32 (diffusers' ``calculate_dimensions``: less is 0), and Qwen2.5-VL's image
# processor refuses aspect ratios over 200:1.
CONDITION_MIN_SIDE = 32
CONDITION_MAX_ASPECT = 200


class QwenImageEditModel(QwenImageModel):
    """Edits an input image as a prompt describes."""

    pipeline_class = QwenImageEditPipeline
    tiny_kind = "edit"
    defaults = EDIT_DEFAULTS
    default_name = EDIT_MODEL_NAME
    location_env = "QWEN_IMAGE_EDIT_LOCATION"
    needs_image = True

    def __init__(self, name: str, options: PredictorOptions):
        super().__init__(name, options)
        raise_decoder_pixel_limit(options.limits.max_input_pixels)

    def prepare(self, request: ImageRequest) -> Job:
        """Decode the input image; without an explicit size, the output keeps its aspect
        ratio at the pipeline's ~1024x1024 area, which must fit the size limits.

        Whatever the output size, the pipeline resizes the input to that area for its
        condition and its vision encoder, which take no side under 32 pixels and no aspect
        ratio over 200:1: a more elongated input is refused on both paths.
        """
        image = decode_image(request.image, self.options.limits.max_input_pixels)
        width, height = edit_condition_size(image)
        shortest, longest = sorted((width, height))
        if shortest < CONDITION_MIN_SIDE or longest > CONDITION_MAX_ASPECT * shortest:
            raise ContractError(
                IMAGE,
                f"'image' has an aspect ratio of {image.width}:{image.height}, more elongated "
                f"than the edit pipeline takes (it would resize it to {width}x{height})",
            )
        if request.width is not None:
            return self.job(request, request.width, request.height, image)
        limits = self.options.limits
        if not (limits.min_size <= min(width, height) and max(width, height) <= limits.max_size):
            raise ContractError(
                IMAGE,
                f"'image' has an aspect ratio of {image.width}:{image.height}, which would "
                f"give a {width}x{height} output, outside {limits.min_size}-{limits.max_size}",
            )
        return self.job(request, width, height, image)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``qwen-image-edit-predictor``."""
    serve(QwenImageEditModel, argv)


if __name__ == "__main__":
    main()
