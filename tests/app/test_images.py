from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from app.errors import InvalidParams, TooLarge, UnsupportedMedia
from app.images import decode_base64, open_checked


def png_bytes(width: int = 8, height: int = 6, color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header claiming ``width``×``height`` with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_a_png_comes_back_as_rgb_of_its_size():
    image = open_checked(png_bytes(8, 6), max_side=64)
    assert image.size == (8, 6) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (200, 10, 10)


def test_not_an_image_is_415_naming_the_field():
    with pytest.raises(UnsupportedMedia, match="`image` is not an image"):
        open_checked(b"%PDF-1.4 hello", max_side=64)


def test_truncated_png_is_422():
    data = png_bytes(64, 64, (1, 2, 3))
    with pytest.raises(InvalidParams, match="truncated or corrupt"):
        open_checked(data[: len(data) // 2], max_side=128)


@pytest.mark.parametrize("side", [20000, 600])
def test_a_header_claiming_too_many_pixels_is_413_before_decoding(side):
    with pytest.raises(TooLarge, match="pixels"):
        open_checked(bomb_png(side, side), max_side=512)


def test_base64_with_or_without_data_url_prefix():
    raw = png_bytes()
    assert decode_base64(base64.b64encode(raw).decode()) == raw
    assert decode_base64("data:image/png;base64," + base64.b64encode(raw).decode()) == raw
    with pytest.raises(InvalidParams, match="`image` must be base64"):
        decode_base64("not base64 at all!")
