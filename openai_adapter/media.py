"""Image files seen from their bytes: the format by magic number, and the pixel size."""

from __future__ import annotations

import io

from PIL import Image


def detect_image_format(data: bytes) -> str | None:
    """'png', 'jpeg' or 'webp' from the file's first bytes; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def describe_image(data: bytes) -> tuple[str, int, int] | None:
    """``(format, width, height)`` from the file's header (pixels are not decoded); None when
    the bytes are not a readable PNG, JPEG or WebP file."""
    image_format = detect_image_format(data)
    if image_format is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (OSError, ValueError):
        return None
    return image_format, width, height
