"""POST /models (checkpoint upload) and GET /models/{id}/download, over real HTTP with the
session's worker; bad uploads refused before any worker sees them."""

from __future__ import annotations

import io
import json
import struct
import zipfile

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save

from app.checkpoint import read_header
from app.config import get_settings
from tests.support import wait_job

pytestmark = pytest.mark.slow


def download(http, model: str, **params) -> bytes:
    """The export's bytes: the first request starts the export job (202), then it streams."""
    r = http.get(f"/models/{model}/download", params=params)
    if r.status_code == 202:
        job = wait_job(http, r.json()["id"], timeout_s=120)
        assert job["status"] == "succeeded", job
        assert job["result"]["links"]["download"].startswith(f"/models/{model}/download?")
        r = http.get(f"/models/{model}/download", params=params)
    assert r.status_code == 200, r.text
    return r.content


def upload(http, model_id: str, data: bytes, filename: str = "model.safetensors",
           **fields):
    files = {"id": (None, model_id), **{k: (None, v) for k, v in fields.items()},
             "file": (filename, data, "application/octet-stream")}
    return http.post("/models", files=files)


def image(http, model: str) -> Image.Image:
    r = http.post("/generate", json={"prompt": "a red circle", "model": model, "steps": 3,
                                     "seed": 11, "width": 32, "height": 32})
    job = wait_job(http, r.json()["id"])
    assert job["status"] == "succeeded", job
    return Image.open(io.BytesIO(http.get(f"/jobs/{job['id']}/images/0").content))


def leftover_uploads(home) -> list:
    return list((home / "outputs").glob("*/upload.safetensors"))


@pytest.fixture(scope="module")
def single_file(http_module) -> bytes:
    return download(http_module, "tiny-sd", format="single-file", dtype="float32")


@pytest.fixture(scope="module")
def http_module(live_url, worker):
    import httpx

    with httpx.Client(base_url=live_url, timeout=60) as c:
        yield c


def test_single_file_download_upload_round_trip(http_module, single_file, tmp_path):
    http = http_module
    file = tmp_path / "tiny.safetensors"
    file.write_bytes(single_file)
    header = read_header(file)
    assert "model.diffusion_model.input_blocks.0.0.weight" in header.shapes
    assert json.loads(header.metadata["lethe"])["id"] == "tiny-sd"
    # Made once: the second request streams the same file, no new job.
    assert http.get("/models/tiny-sd/download",
                    params={"format": "single-file", "dtype": "float32"}).status_code == 200

    r = upload(http, "tiny-uploaded", single_file)
    assert r.status_code == 202, r.text
    job = wait_job(http, r.json()["id"], timeout_s=120)
    assert job["status"] == "succeeded", job
    assert job["type"] == "import" and job["result"]["model"]["id"] == "tiny-uploaded"
    model = http.get("/models/tiny-uploaded").json()
    assert model["kind"] == "text-to-image" and "uploaded as" in model["source"]

    a, b = image(http, "tiny-sd"), image(http, "tiny-uploaded")
    assert a.tobytes() == b.tobytes()  # fp32 through and back: the very same pixels
    # The uploaded model can be deleted; a base model it is not.
    assert http.delete("/models/tiny-uploaded").status_code in (204, 409)


def test_diffusers_download_is_a_zip_of_the_folder(http_module):
    data = download(http_module, "tiny-sd")
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert "tiny-sd/model_index.json" in names
    assert any(n.startswith("tiny-sd/unet/") and n.endswith(".safetensors") for n in names)


def test_download_options_are_checked(http_module):
    r = http_module.get("/models/tiny-sd/download", params={"format": "lora"})
    assert r.status_code == 422 and "needs an edit" in r.json()["error"]["message"]
    r = http_module.get("/models/tiny-sd/download", params={"format": "ckpt"})
    assert r.status_code == 422 and "format" in r.json()["error"]["message"]
    r = http_module.get("/models/tiny-sd/download", params={"format": "single-file",
                                                            "rank": 4})
    assert r.status_code == 422 and "`rank` 4" in r.json()["error"]["message"]
    assert http_module.get("/models/nope/download").status_code == 404


def test_bad_uploads_are_refused_and_leave_nothing(http_module, single_file, home):
    http = http_module
    before = {m["id"] for m in http.get("/models").json()["data"]}

    r = upload(http, "cut", single_file[: len(single_file) // 2])
    assert r.status_code == 422
    assert "`file` 'model.safetensors' is not a whole safetensors file" in \
        r.json()["error"]["message"]

    header = json.dumps({"encoder.weight": {"dtype": "F32", "shape": [2],
                                            "data_offsets": [0, 8]}}).encode()
    other = struct.pack("<Q", len(header)) + header + bytes(8)
    r = upload(http, "other", other)
    assert r.status_code == 422
    assert "no Stable Diffusion UNet" in r.json()["error"]["message"]
    assert "encoder.weight.* (1)" in r.json()["error"]["message"]

    r = upload(http, "pickled", save({"x": torch.zeros(1)}), filename="model.ckpt")
    assert r.status_code == 422 and "pickled checkpoint" in r.json()["error"]["message"]

    r = upload(http, "tiny-sd", single_file)
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_exists"

    r = upload(http, "Bad Id!", single_file)
    message = r.json()["error"]["message"]
    assert r.status_code == 422 and message.startswith("`id`") and "'Bad Id!'" in message

    r = http.post("/models", json={"id": "x"})
    assert r.status_code == 415

    r = http.post("/models", files={"id": (None, "nofile")})
    assert r.status_code == 422 and "`file` is required" in r.json()["error"]["message"]

    assert {m["id"] for m in http.get("/models").json()["data"]} == before
    assert leftover_uploads(home) == []


def test_upload_over_the_limit_is_413(monkeypatch, tiny_model, home):
    from app.main import create_app

    monkeypatch.setenv("LETHE_MAX_UPLOAD_BYTES", "1000")
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as c:
            r = upload(c, "big", bytes(5000))
            assert r.status_code == 413
            assert "`file` must be at most 1000 bytes" in r.json()["error"]["message"]
            # Past the route's limit and its framing allowance, the body is cut off unread.
            r = upload(c, "bigger", bytes(200_000))
            assert r.status_code == 413
    finally:
        get_settings.cache_clear()
    assert leftover_uploads(home) == []
