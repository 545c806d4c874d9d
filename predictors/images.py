"""Decoding input images safely and encoding output images."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from predictors.contract import IMAGE, MASK, ContractError

# The only parsers Pillow tries. Its JPEG parser also opens the multi-picture JPEG phone
# cameras write (MPO), which decodes to its first picture, as a JPEG decoder reads it.
ACCEPTED_INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
# What Pillow's parsers and decoders raise on truncated or corrupt files, in the header or in
# the pixels.
DECODING_ERRORS = (OSError, ValueError, SyntaxError, EOFError)
PIL_SAVE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# The most scans (SOS markers) a JPEG may have. A progressive JPEG's decoder walks all its
# blocks again for each scan, so a few bytes a scan repeated make a file of 20 MB decode for
# minutes. Encoders write about 10 a picture (a thumbnail, or an MPO's second picture, adds
# as many); the marker cannot occur inside a scan's data, where a 0xFF byte is followed by 0.
MAX_JPEG_SCANS = 100
_JPEG_SCAN_MARKER = b"\xff\xda"


def raise_decoder_pixel_limit(max_pixels: int) -> None:
    """Let Pillow open images of up to ``max_pixels``: its own decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``, 89.5 M pixels by default) would otherwise refuse larger
    inputs that a deployment allows. Process-wide, as Pillow's setting is."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def decode_image(data: bytes, max_pixels: int, label: str = "'image'") -> Image.Image:
    """An RGB image from encoded PNG/JPEG/WebP bytes (a multi-picture JPEG gives its first
    picture); ``ContractError`` for anything else, its message about ``label``."""
    image = _open(data, max_pixels, IMAGE, label)
    if image.mode.startswith("I"):  # 16-bit grayscale: a plain convert would clip it to white
        levels = np.asarray(image, dtype=np.float32) / 257  # 65535 -> 255
        image = Image.fromarray(levels.clip(0, 255).round().astype(np.uint8))
    return image.convert("RGB")


def decode_edit_area(
    data: bytes, image: Image.Image, image_label: str, max_pixels: int
) -> Image.Image:
    """The area to repaint that an OpenAI-style mask marks on ``image``: white where the
    mask is fully transparent, black elsewhere, as an ``L`` image (diffusers' convention).

    The mask is a PNG or WebP with an alpha channel, of ``image``'s size, with at least one
    fully transparent pixel; ``ContractError`` otherwise.
    """
    mask = _open(data, max_pixels, MASK, "'mask'")
    if mask.size != image.size:
        raise ContractError(
            MASK,
            f"'mask' is {mask.width}x{mask.height}, and must have the size of the image it "
            f"masks ({image_label}: {image.width}x{image.height})",
        )
    if not mask.has_transparency_data:
        raise ContractError(
            MASK,
            "'mask' has no alpha channel: its fully transparent pixels mark the area to edit",
        )
    if mask.mode.startswith("I") and "transparency" in mask.info:
        # 16-bit grayscale with a transparent level (a tRNS chunk): Pillow's RGBA conversion
        # drops it, and the mask would mark nothing.
        transparent = np.asarray(mask) == mask.info["transparency"]
        area = Image.fromarray(np.where(transparent, 255, 0).astype(np.uint8))
    else:
        alpha = mask.convert("RGBA").getchannel("A")
        area = alpha.point(lambda value: 255 if value == 0 else 0)
    if area.getbbox() is None:
        raise ContractError(
            MASK, "'mask' has no fully transparent pixel, so it leaves nothing to edit"
        )
    return area


def _open(data: bytes, max_pixels: int, param: str, label: str) -> Image.Image:
    """A decoded PNG, JPEG or WebP image, in its own mode and turned upright as its EXIF
    orientation says (as viewers show it); ``ContractError`` about ``param`` for anything else.

    The pixel count (and a JPEG's number of scans) is checked before any pixel is decoded,
    so a decompression bomb costs nothing.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_INPUT_FORMATS)
    except UnidentifiedImageError:  # an OSError: first
        raise ContractError(param, f"{label} is not a PNG, JPEG or WebP image") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ContractError(
            param, f"{label} declares more than the {max_pixels} pixels this server accepts"
        ) from None
    except DECODING_ERRORS as exc:
        raise ContractError(param, f"{label} could not be decoded: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ContractError(
            param,
            f"{label} is {width}x{height} ({width * height} pixels), "
            f"more than the {max_pixels} pixels this server accepts",
        )
    if image.format in ("JPEG", "MPO") and (scans := data.count(_JPEG_SCAN_MARKER)) > (
        MAX_JPEG_SCANS
    ):
        raise ContractError(
            param,
            f"{label} is a JPEG of {scans} scans, more than the {MAX_JPEG_SCANS} this server "
            "decodes",
        )
    try:
        image.load()
    except DECODING_ERRORS as exc:
        raise ContractError(param, f"{label} could not be decoded: {exc}") from None
    turn = _EXIF_TURNS.get(_exif_orientation(image))
    return image if turn is None else image.transpose(turn)


# What turns an image upright, by its EXIF orientation (2-8; 1 is upright), as viewers do.
_EXIF_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _exif_orientation(image: Image.Image) -> int | None:
    """The image's EXIF orientation; None without one, or with EXIF data too damaged to
    read, which leaves the pixels as they are stored."""
    try:
        return image.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # Pillow's EXIF parser raises many kinds on damaged data
        return None


def encode_image(image: Image.Image, output_format: str, quality: int) -> bytes:
    """The image as a file in ``output_format`` (png, jpeg, webp); quality is for jpeg/webp."""
    buffer = io.BytesIO()
    if output_format == "png":
        # Level 1 is several times faster than the default for ~10% more bytes.
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format=PIL_SAVE_FORMATS[output_format], quality=quality)
    return buffer.getvalue()
