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
from tests.support import SHARED_KEYS, bearer, served, wait_job

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
    # Whoever uploaded it deletes it (here the open service's one caller).
    assert http.delete("/models/tiny-uploaded").status_code == 204
    assert http.get("/models/tiny-uploaded").status_code == 404


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


def test_a_key_deletes_its_uploads_and_stores_within_its_quota(single_file, home):
    """Issue 33, finding 3: an upload could not be deleted by its owner, hit the disk
    before any quota, and could take a reserved id (the configured default's)."""
    import httpx

    size = len(single_file)
    with served(LETHE_API_KEYS=SHARED_KEYS, LETHE_DEFAULT_MODEL="house-sd",
                LETHE_MAX_STORAGE_BYTES=str(size * 3 // 2)) as url, \
            httpx.Client(base_url=url, timeout=60, headers=bearer("dave")) as dave, \
            httpx.Client(base_url=url, timeout=60, headers=bearer("bob")) as bob:
        r = upload(dave, "house-sd", single_file)
        assert r.status_code == 409 and "reserved" in r.json()["error"]["message"], r.text
        r = upload(dave, "dave-own", single_file)
        assert r.status_code == 202, r.text
        assert wait_job(dave, r.json()["id"], timeout_s=120)["status"] == "succeeded"
        assert dave.get("/models/dave-own").json()["bytes"] >= size * 9 // 10
        # A second one would pass what dave may store: refused on its declared length.
        r = upload(dave, "dave-more", single_file)
        assert r.status_code == 413, r.text
        assert "LETHE_MAX_STORAGE_BYTES" in r.json()["error"]["message"]
        assert leftover_uploads(home) == []
        assert upload(bob, "bob-own", single_file[:100]).status_code == 422  # his own room
        assert bob.delete("/models/dave-own").status_code == 404  # private: not his to see
        assert dave.delete("/models/dave-own").status_code == 204
        r = upload(dave, "dave-more", single_file)  # room again
        assert r.status_code == 202, r.text
        assert wait_job(dave, r.json()["id"], timeout_s=120)["status"] == "succeeded"
        assert dave.delete("/models/dave-more").status_code == 204


def test_a_keys_models_are_private_to_it_unless_made_public(single_file):
    """Issue 33, finding 9: every key's models were listed to, and usable by, every key."""
    import httpx

    with served(LETHE_API_KEYS=SHARED_KEYS) as url, \
            httpx.Client(base_url=url, timeout=60, headers=bearer("alice")) as alice, \
            httpx.Client(base_url=url, timeout=60, headers=bearer("bob")) as bob, \
            httpx.Client(base_url=url, timeout=60, headers=bearer("root")) as root:
        r = upload(alice, "alice-own", single_file)
        assert r.status_code == 202, r.text
        assert wait_job(alice, r.json()["id"], timeout_s=120)["status"] == "succeeded"
        mine = alice.get("/models/alice-own").json()
        assert mine["visibility"] == "private" and mine["owner"] == "alice"
        # To bob it is not there, whatever road he takes to it.
        assert "alice-own" not in [m["id"] for m in bob.get("/models").json()["data"]]
        assert "alice-own" not in [m["id"] for m in bob.get("/v1/models").json()["data"]]
        for r in (bob.get("/models/alice-own"), bob.get("/v1/models/alice-own"),
                  bob.get("/models/alice-own/download"),
                  bob.post("/generate", json={"prompt": "a red circle", "model": "alice-own"}),
                  bob.post("/erase", json={"concepts": ["red"], "base_model": "alice-own"}),
                  bob.post("/v1/images/generations", json={"prompt": "a red circle",
                                                           "model": "alice-own"}),
                  bob.patch("/models/alice-own", json={"visibility": "public"}),
                  bob.delete("/models/alice-own")):
            assert r.status_code == 404, (r.request.url, r.text)
            assert "alice-own" in r.text
        assert "alice-own" in [m["id"] for m in root.get("/models").json()["data"]]
        assert image(alice, "alice-own").size == (32, 32)
        # Made public by its owner: bob lists and uses it, without learning who made it.
        r = alice.patch("/models/alice-own", json={"visibility": "public"})
        assert r.status_code == 200 and r.json()["visibility"] == "public", r.text
        seen = bob.get("/models/alice-own").json()
        assert "owner" not in seen and seen["visibility"] == "public"
        assert image(bob, "alice-own").size == (32, 32)
        assert bob.patch("/models/alice-own", json={"visibility": "private"}
                         ).status_code == 403
        r = root.patch("/models/tiny-sd", json={"visibility": "private"})
        assert r.status_code == 409, r.text
        r = alice.patch("/models/alice-own", json={"visibility": "hidden"})
        assert r.status_code == 422 and "hidden" in r.text
        assert alice.delete("/models/alice-own").status_code == 204


def test_an_uploads_own_metadata_sets_nothing_past_a_requests_bounds(http_module, single_file,
                                                                      home):
    """Issue 33, finding 8: a file's `lethe` metadata set any default (steps without bound)
    for every caller of the model, and its config folder named the classes diffusers
    imports."""
    from safetensors.torch import load

    tensors = load(single_file)
    meta = read_header_bytes(single_file).metadata
    lethe = json.loads(meta["lethe"])
    greedy = {**lethe, "defaults": {**lethe.get("defaults", {}), "steps": 10**9}}
    r = upload(http_module, "greedy", save(tensors, {**meta, "lethe": json.dumps(greedy)}))
    assert r.status_code == 422, r.text
    assert "`lethe` metadata `defaults.steps` 1000000000" in r.json()["error"]["message"]

    files = json.loads(meta["lethe.config_folder"])
    index = json.loads(files["model_index.json"])
    files["model_index.json"] = json.dumps({**index, "unet": ["os", "system"]})
    r = upload(http_module, "sly", save(tensors, {**meta, "lethe.config_folder":
                                                   json.dumps(files)}))
    assert r.status_code == 422, r.text
    assert "component 'unet' of class ['os', 'system']" in r.json()["error"]["message"]
    assert leftover_uploads(home) == []
    assert http_module.get("/models/greedy").status_code == 404


def read_header_bytes(data: bytes):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "file.safetensors"
        path.write_bytes(data)
        return read_header(path)
