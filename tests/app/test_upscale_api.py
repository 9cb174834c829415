"""POST /upscale's bad input: every case a 4xx naming the problem, nothing queued."""

from __future__ import annotations

import base64

import pytest

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
