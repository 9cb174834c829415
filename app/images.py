"""Checking user images before anything decodes them in full.

An upload is a stranger's bytes: it may not be an image, be cut short, or be a few hundred
bytes whose header claims 20000×20000 pixels (a decompression bomb). The API reads only the
header to check the size against the configured bound, then decodes once, converts to RGB
and stores a plain PNG for the worker, so no worker ever decodes what the API has not.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from app.errors import InvalidParams, TooLarge, UnsupportedMedia

# The formats a user may upload; anything else is a 415 even if Pillow could open it.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP")


def decode_base64(text: str, field: str = "image") -> bytes:
    """The bytes of a base64 string (a ``data:image/...;base64,`` prefix is allowed)."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParams(f"`{field}` must be base64-encoded image bytes, got "
                            f"{text[:20]!r}{'...' if len(text) > 20 else ''}") from None


def _unreadable(field: str, exc: Exception) -> InvalidParams:
    return InvalidParams(f"`{field}` could not be decoded ({str(exc)[:120]}): a truncated or "
                         "corrupt file?")


def open_checked(data: bytes, max_side: int, field: str = "image") -> Image.Image:
    """Decode ``data`` as an RGB image at most ``max_side`` on a side, or raise a 4xx.

    Pillow raises whatever its decoders raise on malformed input (OSError for a cut-short
    JPEG or WebP, ValueError for a PNG text or ICC chunk that inflates past its limit,
    SyntaxError, EOFError, struct.error...): any of them is the file's fault, a 422.
    """
    if not data:
        raise InvalidParams(f"`{field}` is empty: expected image bytes")
    try:
        image = Image.open(io.BytesIO(data))  # the header, and a PNG's chunks before IDAT
    except Image.DecompressionBombError as exc:  # Pillow's own bound, before ours
        raise TooLarge(f"`{field}` claims too many pixels to decode ({exc})") from None
    except UnidentifiedImageError:
        raise UnsupportedMedia(
            f"`{field}` is not an image this service reads ({', '.join(FORMATS)}); "
            f"its first bytes are {data[:8]!r}") from None
    except Exception as exc:
        raise _unreadable(field, exc) from None
    if image.format not in FORMATS:
        raise UnsupportedMedia(f"`{field}` is a {image.format} image; send one of "
                               f"{', '.join(FORMATS)}")
    width, height = image.size
    if width > max_side or height > max_side:
        raise TooLarge(f"`{field}` is {width}×{height} pixels; at most {max_side} on a side "
                       "is accepted")
    if width < 1 or height < 1:
        raise InvalidParams(f"`{field}` is {width}×{height} pixels: empty")
    try:
        image.load()
        return image.convert("RGB")
    except Exception as exc:
        raise _unreadable(field, exc) from None


def save_input(image: Image.Image, path: Path) -> Path:
    """Store the checked image where the worker reads it (written whole, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
