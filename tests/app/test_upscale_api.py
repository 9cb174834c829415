"""POST /upscale's bad input: every case a 4xx naming the problem, nothing queued."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from tests.app.test_images import bomb_png, png_bytes


def upload(client, data: bytes, **fields):
    return client.post("/upscale", files={"image": ("in.png", data, "image/png")},
                       data={k: str(v) for k, v in fields.items()})


def assert_error(r, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    for w in words:
        assert w in message, message


def test_not_an_image_is_415(client):
    assert_error(upload(client, b"hello, I am text"), 415, "`image`", "not an image")


def test_truncated_png_is_422(client):
    data = png_bytes(64, 64)
    assert_error(upload(client, data[:60]), 422, "`image`", "truncated")


def test_decompression_bomb_is_413_without_decoding(client):
    assert_error(upload(client, bomb_png(20000, 20000)), 413, "`image`")


def test_upload_over_the_byte_limit_is_413(client):
    from app.config import get_settings

    limit = get_settings().max_body_bytes
    assert_error(upload(client, b"\0" * (limit + 1)), 413, "at most")


def test_json_base64_needs_exactly_one_input(client):
    b64 = base64.b64encode(png_bytes()).decode()
    assert_error(client.post("/upscale", json={}), 422, "exactly one")
    assert_error(client.post("/upscale", json={"image": b64,
                                               "source": {"job_id": "x", "index": 0}}),
                 422, "exactly one")
    assert_error(client.post("/upscale", json={"image": "%%%"}), 422, "`image`", "base64")


@pytest.mark.parametrize(("fields", "words"), [
    ({"steps": 0}, ("`steps`", "0")),
    ({"noise_level": 351}, ("`noise_level`", "351")),
    ({"model": "tiny-sd"}, ("`model`", "not an upscaler")),
    ({"colour": "red"}, ("`colour`",)),
])
def test_bad_fields_are_422_naming_them(client, fields, words):
    assert_error(upload(client, png_bytes(), **fields), 422, *words)


def test_unknown_model_is_404(client):
    assert_error(upload(client, png_bytes(), model="no-such-x4"), 404, "no-such-x4")


def test_unknown_source_job_is_404_and_unfinished_is_409(client, redis):
    assert_error(client.post("/upscale", json={"source": {"job_id": "nope", "index": 0}}),
                 404, "nope")
    # A queued job on a queue no test worker reads (it is canceled right after).
    r = client.post("/generate", json={"prompt": "a red circle", "steps": 500,
                                       "width": 256, "height": 256})
    job_id = r.json()["id"]
    try:
        assert_error(client.post("/upscale", json={"source": {"job_id": job_id, "index": 0}}),
                     409, job_id)
    finally:
        client.delete(f"/jobs/{job_id}")


def test_other_content_types_are_415(client):
    assert_error(client.post("/upscale", content=b"x", headers={"content-type": "text/plain"}),
                 415, "text/plain")


def test_output_over_the_configured_side_is_refused(client):
    # 600 px a side would upscale to 2400 > LETHE_MAX_UPSCALE_SIDE (2048).
    assert_error(upload(client, png_bytes(600, 8)), 413, "600")


def test_cascade_over_the_output_limit_is_422(client, monkeypatch):
    from app.config import get_settings

    monkeypatch.setenv("LETHE_MAX_UPSCALE_SIDE", "512")
    get_settings.cache_clear()
    try:
        r = client.post("/generate", json={"prompt": "a red circle", "width": 256,
                                           "height": 64, "upscale": {"steps": 2}})
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert_error(r, 422, "`width/height`", "256×64", "512")


def encoded(fmt: str, side: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


def png_with_chunk(kind: bytes, data: bytes) -> bytes:
    """A valid PNG with one more chunk right after its header."""
    chunk = (struct.pack(">I", len(data)) + kind + data
             + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    plain = encoded("PNG")
    return plain[:33] + chunk + plain[33:]  # 8-byte signature + 25-byte IHDR


MALFORMED = {
    "truncated JPEG": lambda: encoded("JPEG")[:300],
    "truncated WebP": lambda: encoded("WEBP")[:60],
    # Text and ICC chunks are inflated while the header is read: past Pillow's bound they
    # raise before any pixel is touched.
    "PNG with a 2 MB zTXt": lambda: png_with_chunk(
        b"zTXt", b"Comment\0\0" + zlib.compress(b"a" * (2 << 20))),
    "PNG with a 30 MB iCCP": lambda: png_with_chunk(
        b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * (30 << 20))),
    "PNG whose chunk length lies": lambda: (
        encoded("PNG")[:33] + b"\x7f\xff\xff\xffiCCP" + b"x" * 64),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_uploads_are_422_naming_the_field(client, name):
    data = MALFORMED[name]()
    for r in (upload(client, data),
              client.post("/upscale", json={"image": base64.b64encode(data).decode()})):
        assert_error(r, 422, "`image`", "could not be decoded")


def test_a_repeated_form_field_is_422_not_silently_the_last(client):
    r = client.post("/upscale", files=[("image", ("in.png", png_bytes(), "image/png"))],
                    data={"steps": ["2", "3"]})
    assert_error(r, 422, "`steps`", "more than once")
    r = client.post("/upscale", files=[("image", ("a.png", png_bytes(), "image/png")),
                                       ("image", ("b.png", png_bytes(), "image/png"))])
    assert r.status_code in (413, 422), r.text


def test_an_upload_refused_for_want_of_redis_leaves_no_file(monkeypatch, tiny_model, home):
    from fastapi.testclient import TestClient

    from app.config import get_settings
    from app.main import create_app

    monkeypatch.setenv("LETHE_REDIS_URL", "redis://127.0.0.1:1/0")  # refused at once
    get_settings.cache_clear()
    outputs = home / "outputs"
    before = set(outputs.iterdir()) if outputs.exists() else set()
    try:
        with TestClient(create_app()) as c:
            assert_error(upload(c, png_bytes(16, 16)), 503, "Redis")
    finally:
        get_settings.cache_clear()
    assert (set(outputs.iterdir()) if outputs.exists() else set()) == before


def test_a_canceled_queued_upload_leaves_no_file(monkeypatch, tiny_model, home):
    from fastapi.testclient import TestClient

    from app.config import get_settings
    from app.main import create_app
    from tests.conftest import scratch_redis_url

    monkeypatch.setenv("LETHE_REDIS_URL", scratch_redis_url())  # no worker listens there
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as c:
            job_id = upload(c, png_bytes(16, 16)).json()["id"]
            assert (home / "outputs" / job_id / "input.png").is_file()
            assert c.delete(f"/jobs/{job_id}").json()["status"] == "canceled"
    finally:
        get_settings.cache_clear()
    assert not (home / "outputs" / job_id).exists()
