"""Request and response models of the OpenAI Images API, as this adapter serves it.

They mirror OpenAI's spec (``/v1/images/generations``, ``/v1/images/edits``, ``/v1/models``
and the error body) plus the original Qwen-Image service's fields, which the ``openai`` SDK
sends through ``extra_body``. Unknown fields are rejected, so a typo is a 400, not a no-op.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from predictors.contract import (
    MAX_PARTIAL_IMAGES,
    MAX_PROMPT_CHARACTERS,
    MAX_SEED,
    SIZE_MULTIPLE,
)

OutputFormat = Literal["png", "jpeg", "webp"]
# What a request may ask for: OpenAI's formats, of which this service makes the first three.
RequestedOutputFormat = Literal["png", "jpeg", "webp", "gif", "svg"]
Quality = Literal["auto", "standard", "low", "medium", "high", "hd", "xhigh", "max"]
# The quality an answer reports: the level of the quality table whose steps made its images.
# OpenAI's answers name these levels only (its events also "auto").
ImageQuality = Literal["low", "medium", "high", "xhigh", "max"]
# What an answer says of its images' background: this service makes no transparent ones.
Background = Literal["opaque"]

_EDIT_IMAGES_NOTE = (
    ": one, or several for a model that edits from several (Qwen-Image-Edit-2509 and later)."
)
_MASK_DESCRIPTION = (
    "A PNG or WebP of the first image's size whose fully transparent pixels mark the area to "
    "repaint; the rest of that image is kept."
)
_QUALITY_DESCRIPTION = (
    "The level of the adapter's quality table whose steps made the images (hd: high); "
    "{absent} when the steps match no level (the predictor's default, or a "
    "num_inference_steps of no level)."
)
_BACKGROUND_DESCRIPTION = "The images' background: always opaque."
_SAFETY_IDENTIFIER_DESCRIPTION = (
    "The request's safety_identifier, or else its user; left out when it sent neither."
)
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")


class ImageRequest(BaseModel):
    """The fields that generations and edits share."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARACTERS,
        description="What to draw, or how to change the image.",
    )
    model: str | None = Field(None, description="A model id from /v1/models.")
    n: int | None = Field(None, ge=1, le=10, description="Number of images (1-10).")
    size: str | None = Field(
        None,
        description="'WIDTHxHEIGHT' (multiples of 16) or 'auto' (the model's default). "
        "'width'/'height' override the matching side.",
        examples=["1024x1024", "1664x928", "auto"],
    )
    quality: Quality | None = Field(
        None,
        description="Sets num_inference_steps (see the adapter's quality table); "
        "an explicit num_inference_steps wins.",
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="Only 'b64_json' is supported."
    )
    output_format: RequestedOutputFormat | None = Field(
        None, description="Encoding of the images; 'gif' and 'svg' are not supported."
    )
    output_compression: int | None = Field(
        None, ge=0, le=100, description="Quality (0-100) of jpeg and webp images."
    )
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        None, description="'transparent' is not supported."
    )
    stream: bool | None = Field(
        None,
        description="Answer as server-sent events: 'partial_image' events while the images "
        "are made (see partial_images), then one 'completed' event per image.",
    )
    partial_images: int | None = Field(
        None,
        ge=0,
        le=MAX_PARTIAL_IMAGES,
        description="Previews of each image a stream sends while it is made, spread over its "
        "denoising steps; fewer when the steps are few.",
    )
    complexity: Literal["low", "medium", "high"] | None = Field(
        None,
        description="Planning effort of OpenAI's models; accepted and ignored (Qwen-Image "
        "does not plan: 'quality' sets the denoising steps).",
    )
    frame_count: int | None = Field(None, description="GIF output's; not supported.")
    frame_duration_ms: int | None = Field(None, description="GIF output's; not supported.")
    svg: dict[str, Any] | None = Field(None, description="SVG output's; not supported.")
    user: str | None = Field(
        None,
        description="Deprecated end-user id; echoed as 'safety_identifier' when that is not sent.",
    )
    safety_identifier: str | None = Field(
        None, description="End-user id for abuse monitoring; echoed in the answer."
    )
    # The original Qwen-Image service's fields (``extra_body`` in the openai SDK).
    width: int | None = Field(None, description="Image width in pixels (multiple of 16).")
    height: int | None = Field(None, description="Image height in pixels (multiple of 16).")
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARACTERS, description="What to steer away from."
    )
    num_inference_steps: int | None = Field(None, description="Denoising steps.")
    true_cfg_scale: float | None = Field(
        None, allow_inf_nan=False, description="Classifier-free guidance scale."
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Seed of the first image; image i uses seed + i.",
    )

    @field_validator(
        "n",
        "output_compression",
        "partial_images",
        "frame_count",
        "frame_duration_ms",
        "width",
        "height",
        "num_inference_steps",
        "true_cfg_scale",
        "seed",
        mode="before",
    )
    @classmethod
    def _refuse_booleans(cls, value: Any) -> Any:
        # pydantic would read JSON's true as 1: a number field takes a number (or, from a
        # form, its text), as OpenAI's API does.
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")
        return value

    @field_validator("size")
    @classmethod
    def _check_size(cls, size: str | None) -> str | None:
        if size is None or size == "auto":
            return size
        match = _SIZE.fullmatch(size)
        if not match or any(int(side) % SIZE_MULTIPLE for side in match.groups()):
            raise ValueError(
                f"must be 'auto' or 'WIDTHxHEIGHT' with sides that are multiples of "
                f"{SIZE_MULTIPLE}, got {size!r}"
            )
        return size

    @property
    def effective_safety_identifier(self) -> str | None:
        """The answer's ``safety_identifier``: the request's, or else its deprecated
        ``user``, as OpenAI echoes them (an empty one counts as not sent)."""
        return self.safety_identifier or self.user or None

    @property
    def size_pixels(self) -> tuple[int, int] | None:
        """``(width, height)`` of ``size``, or None for 'auto' or no size."""
        match = _SIZE.fullmatch(self.size or "")
        return (int(match.group(1)), int(match.group(2))) if match else None


class ImageGenerationRequest(ImageRequest):
    """``POST /v1/images/generations`` (JSON)."""

    moderation: Literal["low", "auto"] | None = Field(None, description="Accepted and ignored.")
    style: Literal["vivid", "natural"] | None = Field(
        None, description="dall-e-3's style; accepted and ignored."
    )


class ImageEditRequest(ImageRequest):
    """``POST /v1/images/edits`` as a multipart form, the images uploaded as files (what the
    openai SDK sends)."""

    # The form fields that may be sent several times, each time with one more value.
    LIST_FIELDS: ClassVar[tuple[str, ...]] = ("image", "image[]")
    # The field that errors about the images name.
    IMAGES_PARAM: ClassVar[str] = "image"

    image: list[UploadFile] | None = Field(
        None,
        description=f"The PNG, JPEG or WebP image(s) to edit{_EDIT_IMAGES_NOTE}",
    )
    image_list: list[UploadFile] | None = Field(
        None, alias="image[]", description="The same, as the openai SDK sends a list."
    )
    mask: UploadFile | None = Field(None, description=_MASK_DESCRIPTION)
    markup: UploadFile | None = Field(
        None, description="OpenAI's annotation overlay; not supported (send a mask)."
    )
    input_fidelity: Literal["high", "low"] | None = Field(None, description="Accepted and ignored.")

    @property
    def images(self) -> list[UploadFile]:
        """Every uploaded image, whichever field carried it."""
        return [*(self.image or ()), *(self.image_list or ())]


class ImageReference(BaseModel):
    """An image of a JSON edit (OpenAI's ``ImageRefParam``): exactly one of a URL and a file
    id."""

    model_config = ConfigDict(extra="forbid")

    image_url: str | None = Field(
        None,
        description="The image as a base64 data URL ('data:image/png;base64,...'), or as an "
        "http(s) URL on a host that the deployment lists (QWEN_ADAPTER_IMAGE_URL_HOSTS).",
    )
    file_id: str | None = Field(
        None, description="An id from OpenAI's Files API, which this server does not offer."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ImageReference:
        if (self.image_url is None) == (self.file_id is None):
            raise ValueError("give exactly one of 'image_url' and 'file_id'")
        return self


class ImageEditJsonRequest(ImageRequest):
    """``POST /v1/images/edits`` as a JSON object (OpenAI's ``EditImageBodyJsonParam``), the
    images given by URL."""

    IMAGES_PARAM: ClassVar[str] = "images"

    images: list[ImageReference] = Field(
        description=f"The images to edit, in order{_EDIT_IMAGES_NOTE}"
    )
    mask: ImageReference | None = Field(None, description=_MASK_DESCRIPTION)
    input_fidelity: Literal["high", "low"] | None = Field(None, description="Accepted and ignored.")
    moderation: Literal["low", "auto"] | None = Field(None, description="Accepted and ignored.")


class ImageData(BaseModel):
    """One image of a response."""

    b64_json: str = Field(description="The encoded image, base64.")
    seed: int = Field(description="The seed this image was made with (an extension).")


class ImagesResponse(BaseModel):
    """The answer to a generation or an edit."""

    created: int = Field(description="Unix time of the answer.")
    data: list[ImageData]
    output_format: OutputFormat
    size: str = Field(description="'WIDTHxHEIGHT' of the images.", examples=["1664x928"])
    quality: ImageQuality | None = Field(
        None, description=_QUALITY_DESCRIPTION.format(absent="left out")
    )
    background: Background = Field(description=_BACKGROUND_DESCRIPTION)
    safety_identifier: str | None = Field(None, description=_SAFETY_IDENTIFIER_DESCRIPTION)


class ImageEvent(BaseModel):
    """What every image event of a streamed answer (``stream: true``) carries."""

    type: str
    b64_json: str = Field(description="The encoded image, base64.")
    created_at: int = Field(description="Unix time of the event.")
    size: str = Field(description="'WIDTHxHEIGHT' of the image.")
    quality: ImageQuality | Literal["auto"] = Field(
        description=_QUALITY_DESCRIPTION.format(absent="'auto'")
    )
    background: Background = Field(description=_BACKGROUND_DESCRIPTION)
    output_format: OutputFormat
    seed: int = Field(description="The seed the image is made with (an extension).")


class ImagePartialEvent(ImageEvent):
    """A preview of an image (``partial_images``): OpenAI's
    ``image_generation.partial_image`` or ``image_edit.partial_image`` server-sent event."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    partial_image_index: int = Field(description="0, 1, ... for each image's previews.")


class InputTokensDetails(BaseModel):
    """OpenAI's input tokens by kind."""

    image_tokens: int = 0
    text_tokens: int = 0


class TokenUsage(BaseModel):
    """OpenAI's token usage of an image: this service counts no tokens, so all zeros."""

    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    total_tokens: int = 0


class ImageCompletedEvent(ImageEvent):
    """One image, after its previews if any: OpenAI's ``image_generation.completed`` or
    ``image_edit.completed`` server-sent event."""

    type: Literal["image_generation.completed", "image_edit.completed"]
    usage: TokenUsage = Field(
        default_factory=TokenUsage,
        description="OpenAI's token usage, which its events require: zeros (no tokens are "
        "counted).",
    )
    safety_identifier: str | None = Field(None, description=_SAFETY_IDENTIFIER_DESCRIPTION)


class ModelCard(BaseModel):
    """One entry of ``/v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    """What went wrong, in OpenAI's terms."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error body: ``{"error": {...}}``."""

    error: ErrorInfo


class StreamErrorEvent(BaseModel):
    """The ``error`` server-sent event that ends a stream that fails after its first event."""

    type: Literal["error"] = "error"
    error: ErrorInfo
