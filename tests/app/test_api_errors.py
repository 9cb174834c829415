"""Bad input gets a 4xx whose message names the field and the value; never a 500."""

from __future__ import annotations

import socket
import time

import pytest
from fastapi.testclient import TestClient

from app.config import get_settings


def post(client, **body):
    return client.post("/generate", json={"prompt": "a red circle", **body})


@pytest.mark.parametrize(
    ("body", "field", "value"),
    [
        ({"prompt": ""}, "prompt", "''"),
        ({"prompt": "   "}, "prompt", "'   '"),
        ({"prompt": "x" * 1001}, "prompt", "xxx"),
        ({"steps": 0}, "steps", "0"),
        ({"steps": 501}, "steps", "501"),
        ({"guidance_scale": -1}, "guidance_scale", "-1"),
        ({"width": 500}, "width", "500"),
        ({"height": 4}, "height", "4"),
        ({"width": 4096}, "width", "4096"),
        ({"num_images": 9}, "num_images", "9"),
        ({"num_images": 0}, "num_images", "0"),
        ({"seed": -5}, "seed", "-5"),
        ({"scheduler": "magic"}, "scheduler", "'magic'"),
        ({"colour": "red"}, "colour", "'red'"),
        ({"steps": "many"}, "steps", "'many'"),
    ],
)
def test_invalid_generate_fields_are_422_naming_field_and_value(client, body, field, value):
    r = post(client, **body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_params"
    assert f"`{field}`" in error["message"] and value in error["message"], error["message"]


def test_size_over_the_models_limit_is_422(client):
    # tiny-sd's manifest caps a side at 256.
    r = post(client, model="tiny-sd", width=512, height=64)
    assert r.status_code == 422
    assert "`width`" in r.json()["error"]["message"] and "512" in r.json()["error"]["message"]


def test_missing_prompt_is_named(client):
    r = client.post("/generate", json={"steps": 2})
    assert r.status_code == 422 and "`prompt` is required" in r.json()["error"]["message"]


def test_malformed_json_is_422(client):
    r = client.post("/generate", content=b'{"prompt": "a red',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "not valid JSON" in r.json()["error"]["message"]


def test_unknown_model_is_404_model_not_found(client):
    r = post(client, model="no-such-model")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert "'no-such-model'" in r.json()["error"]["message"]


def test_malformed_model_id_is_422(client):
    r = post(client, model="../etc")
    assert r.status_code == 422 and "'../etc'" in r.json()["error"]["message"]


@pytest.mark.parametrize("job_id", ["0f0e8d6c-0000-4000-8000-000000000000", "x:y", "a" * 200])
def test_unknown_job_is_404(client, job_id):
    for r in (client.get(f"/jobs/{job_id}"), client.delete(f"/jobs/{job_id}"),
              client.get(f"/jobs/{job_id}/images/0")):
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "job_not_found"


def test_image_of_unfinished_job_is_409(client):
    job_id = post(client, model="tiny-sd", steps=2).json()["id"]
    r = client.get(f"/jobs/{job_id}/images/0")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_finished"
    client.delete(f"/jobs/{job_id}")  # leave nothing for the session worker


def test_unknown_route_uses_the_error_envelope(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_oversized_body_is_413(client, monkeypatch):
    limit = get_settings().max_body_bytes
    r = client.post("/generate", content=b"x" * (limit + 1),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_models_routes(client):
    listing = client.get("/models").json()
    assert listing["count"] == len(listing["data"]) >= 1
    assert "tiny-sd" in [m["id"] for m in listing["data"]]
    tiny = client.get("/models/tiny-sd").json()
    assert tiny["kind"] == "text-to-image" and len(tiny["digest"]) == 64
    assert client.get("/models/nope").status_code == 404
    r = client.delete("/models/tiny-sd")
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_protected"
    assert client.get("/models/tiny-sd").status_code == 200


def test_api_keys_guard_everything_but_health(monkeypatch, tiny_model):
    from app.main import create_app

    monkeypatch.setenv("LETHE_API_KEYS", "k1, k2")
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as c:
            assert c.get("/healthz").status_code == 200
            r = c.get("/models")
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert c.get("/models", headers={"Authorization": "Bearer nope"}).status_code == 401
            assert c.get("/models", headers={"Authorization": "Bearer k2"}).status_code == 200
            assert c.post("/generate", json={"prompt": "a"}).status_code == 401
    finally:
        get_settings.cache_clear()


@pytest.fixture
def silent_port():
    """A loopback port that accepts connections and never answers (a hung Redis)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


@pytest.mark.parametrize("hung", [False, True], ids=["refused", "hung"])
def test_unreachable_redis_is_503_within_seconds(monkeypatch, tiny_model, silent_port, hung):
    from app.main import create_app

    port = silent_port if hung else 1  # nothing listens on port 1: refused at once
    monkeypatch.setenv("LETHE_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as c:
            for call in (lambda: c.post("/generate", json={"prompt": "a", "steps": 2}),
                         lambda: c.get("/jobs/abc"), lambda: c.get("/readyz")):
                t0 = time.monotonic()
                r = call()
                assert r.status_code == 503, r.text
                assert time.monotonic() - t0 < 3.5
            assert r.json()["status"] == "unavailable"
    finally:
        get_settings.cache_clear()


def test_health(client):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/docs").status_code == 200
    assert "/generate" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"concepts": []}, 422, "`concepts`"),
        ({"concepts": ["  "]}, 422, "`concepts`"),
        ({"concepts": ["red", "Red"]}, 422, "distinct"),
        ({"concepts": ["red"], "method": "esd-q"}, 422, "'esd-q'"),
        ({"concepts": ["red"], "iterations": 0}, 422, "`iterations`"),
        ({"concepts": ["red"], "learning_rate": 0}, 422, "`learning_rate`"),
        ({"concepts": ["red"], "base_model": "nope"}, 404, "'nope'"),
        ({"concepts": ["red"], "name": "Bad Name"}, 422, "'Bad Name'"),
        ({"concepts": ["red"], "name": "tiny-sd"}, 409, "'tiny-sd'"),
        ({"concepts": ["red"], "evaluate": True}, 422, "`evaluate`"),
        # tiny-sd names no domain: there is no neighbour to preserve.
        ({"concepts": ["red"], "preserve": True}, 422, "`preserve`"),
    ],
)
def test_invalid_erase_requests(client, body, status, needle):
    r = client.post("/erase", json={"base_model": "tiny-sd", **body})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        # No CLIP model configured: the message names the setting to set.
        ({"model": "tiny-sd", "prompts": ["a cat"]}, 422, "LETHE_CLIP_MODEL_PATH"),
        ({"model": "shapes-sd", "metrics": ["clip_score"]}, 422, "LETHE_CLIP_MODEL_PATH"),
        ({"model": "tiny-sd", "prompts": ["a"], "metrics": ["fid"]}, 422, "`reference`"),
        ({"model": "tiny-sd", "prompts": ["a"], "metrics": ["fid"], "reference": "photos"},
         422, "'photos'"),
        ({"model": "tiny-sd", "prompts": ["a"], "metrics": ["fid"], "reference": "../etc"},
         422, "'../etc'"),
        ({"model": "tiny-sd", "prompts": ["a"], "metrics": ["accuracy"]}, 422, "classifier"),
        ({"model": "tiny-sd", "prompts": ["a"], "metrics": ["fid"], "reference": "render"},
         422, "'render'"),
        ({"model": "tiny-sd", "metrics": ["fid"]}, 422, "`prompts` is required"),
        ({"model": "tiny-sd", "prompt_set": "shapes-color", "metrics": ["fid"]}, 422,
         "'shapes-color'"),
        ({"model": "shapes-sd", "prompts": ["a"], "prompt_set": "shapes-color"}, 422,
         "not both"),
        ({"model": "shapes-sd", "images_per_prompt": 200}, 422, "LETHE_MAX_EVAL_IMAGES"),
        ({"model": "shapes-sd", "images_per_prompt": 0}, 422, "`images_per_prompt`"),
        ({"model": "shapes-sd", "metrics": ["fid", "fid"]}, 422, "distinct"),
        ({"model": "shapes-sd", "metrics": ["psnr"]}, 422, "'psnr'"),
        ({"model": "shapes-sd", "prompts": ["a circle"], "metrics": ["precision_recall"],
          "images_per_prompt": 4},
         422, "at least 8"),
        ({"model": "shapes-x4"}, 422, "'shapes-x4'"),
        ({"model": "nope"}, 404, "'nope'"),
    ],
)
def test_invalid_evaluate_requests(client, body, status, needle):
    r = client.post("/evaluate", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_evaluate_on_a_shapes_model_is_queued_with_its_defaults(client):
    r = client.post("/evaluate", json={"model": "shapes-sd", "images_per_prompt": 2})
    assert r.status_code == 202, r.text
    job = client.get(r.headers["Location"]).json()
    assert job["type"] == "evaluate"
    assert job["params"]["metrics"] == ["fid", "precision_recall", "attribute_score",
                                        "accuracy"]
    assert job["params"]["prompt_set"] == "shapes-color"
    assert job["params"]["reference"] == "render"
    assert job["params"]["evaluator"] == "shapes-clf"
    client.delete(r.headers["Location"])
