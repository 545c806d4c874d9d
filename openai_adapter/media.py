"""Image files seen from their bytes (the format by magic number, the pixel size), and the
bytes of data URLs."""

from __future__ import annotations

import io

import pybase64
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


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 data URL (``data:[<media type>];base64,<data>``, RFC 2397).

    Raises ValueError, saying what is wrong, for any other URL or for data that is not base64.
    """
    header, comma, payload = url.partition(",")
    if header[:5].lower() != "data:" or not comma:
        raise ValueError("is not a data URL")
    if not header.lower().endswith(";base64"):
        raise ValueError("is a data URL without ';base64'")
    try:
        return pybase64.b64decode(payload, validate=True)
    except ValueError:
        pass
    try:  # base64 as tools write it, in lines
        return pybase64.b64decode("".join(payload.split()), validate=True)
    except ValueError:
        raise ValueError("holds data that is not valid base64") from None
