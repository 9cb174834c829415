"""Bad input gets a 4xx whose message names the field and the value; never a 500."""

from __future__ import annotations

import re
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
            assert "127.0.0.1" not in r.json()["detail"]  # the host's address stays here
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
        # Neighbours are held while varied prompts are trained, not with the bare concept.
        ({"concepts": ["red"], "preserve": True, "train_prompts": "plain"}, 422,
         "`preserve`"),
        ({"concepts": ["red"], "preserve_prompts": ["a cat"], "train_prompts": "plain"}, 422,
         "`preserve_prompts`"),
        ({"concepts": ["red"], "concept_kind": "colour"}, 422, "'colour'"),
        # shapes-sd's domain knows no kinds: the field means nothing there.
        ({"concepts": ["red"], "concept_kind": "style", "base_model": "shapes-sd"}, 422,
         "`concept_kind`"),
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
        # Attacks: a base model names no erased concept, and has no edit to relearn.
        ({"model": "shapes-sd", "metrics": []}, 422, "`metrics` []"),
        ({"model": "shapes-sd", "metrics": [], "attack": {}}, 422, "`attack.concepts`"),
        ({"model": "shapes-sd", "metrics": [], "attack": {"concepts": ["triangle"]}}, 422,
         "'relearning'"),
        ({"model": "shapes-sd", "attack": {"attacks": ["jailbreak"]}}, 422, "'jailbreak'"),
        ({"model": "shapes-sd", "attack": {"budgets": [-1]}}, 422, "budgets"),
        ({"model": "shapes-sd", "attack": {"judge_images": 100000}}, 422, "judge_images"),
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


def test_attacks_on_a_base_model_name_their_concepts_and_are_queued_whole(client):
    r = client.post("/evaluate", json={"model": "shapes-sd", "metrics": [], "attack": {
        "concepts": ["triangle"], "attacks": ["conditioning"], "budgets": [1.0]}})
    assert r.status_code == 202, r.text
    params = client.get(r.headers["Location"]).json()["params"]
    assert params["attack"]["concepts"] == ["triangle"] and params["attack_base"] == "shapes-sd"
    assert params["attack"]["judge_images"] == 48  # every default written out
    assert params["attack"]["relearn_lr"] == 1e-4  # a base records no learning rate
    client.delete(r.headers["Location"])


def test_ids_are_matched_whole_not_up_to_a_trailing_newline(client):
    r = client.get("/models/tiny-sd%0a")
    assert r.status_code == 422 and "'tiny-sd\\n'" in r.json()["error"]["message"]
    r = client.post("/erase", json={"base_model": "tiny-sd", "concepts": ["red"],
                                    "name": "tiny-x\n"})
    assert r.status_code == 422 and "`name`" in r.json()["error"]["message"]
    assert client.get("/jobs/abc%0a").status_code == 404


def test_a_huge_job_id_is_not_echoed_whole(client):
    r = client.get("/jobs/" + "a" * 30_000)
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < 200


def test_a_chunked_body_over_the_limit_is_413(client):
    limit = get_settings().max_body_bytes

    def chunks():  # no Content-Length: the size is known only by reading
        for _ in range(limit // (1 << 20) + 2):
            yield b" " * (1 << 20)

    r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_without_a_key_broken_json_is_401_before_422(monkeypatch, tiny_model):
    from app.main import create_app

    monkeypatch.setenv("LETHE_API_KEYS", "k1")
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as c:
            r = c.post("/generate", content=b'{"prompt": ', headers={
                "content-type": "application/json"})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            r = c.post("/generate", content=b'{"prompt": ', headers={
                "content-type": "application/json", "authorization": "Bearer k1"})
            assert r.status_code == 422
            # The description of the API and the docs page stay open.
            assert c.get("/openapi.json").status_code == 200
            assert c.get("/docs").status_code == 200
    finally:
        get_settings.cache_clear()


def test_key_check_accepts_only_a_configured_key():
    from app.middleware import key_matches

    keys = ("k1-long-secret", "k2")
    assert key_matches("k2", keys) and key_matches("k1-long-secret", keys)
    assert not key_matches("k1", keys) and not key_matches("", keys)
    assert not key_matches("k1-long-secret ", keys) and not key_matches("k2", ())


def test_answers_tell_browsers_not_to_sniff_and_405_says_what_is_allowed(client):
    assert client.get("/healthz").headers["x-content-type-options"] == "nosniff"
    assert client.get("/nope").headers["x-content-type-options"] == "nosniff"
    r = client.request("TRACE", "/generate")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    # Every method of the path, not those of its first route only.
    r = client.request("OPTIONS", "/jobs/abc")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"


def test_the_docs_page_loads_nothing_from_elsewhere(client):
    page = client.get("/docs").text
    sources = re.findall(r'(?:src|href)=["\']([^"\']+)', page)
    assert sources and all(s.startswith("/") for s in sources), sources
    for path in sources:
        assert client.get(path).status_code == 200, path


def test_every_ref_in_the_openapi_document_resolves(client):
    import json

    doc = client.get("/openapi.json").json()
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert "UpscaleCreate" in refs
    assert refs <= set(doc["components"]["schemas"]), refs - set(doc["components"]["schemas"])


def test_messages_do_not_show_this_machines_paths(client, home):
    r = client.post("/evaluate", json={"model": "tiny-sd", "prompts": ["a"],
                                       "metrics": ["fid"], "reference": "photos"})
    assert r.status_code == 422 and str(home) not in r.json()["error"]["message"]
    assert "$LETHE_HOME/references/" in r.json()["error"]["message"]


def test_a_long_poll_reads_redis_a_few_times_a_second(monkeypatch, tiny_model):
    from app.api.routes import jobs as routes
    from app.main import create_app
    from tests.conftest import scratch_redis_url

    reads = []
    real = routes._read
    monkeypatch.setattr(routes, "_read", lambda *a: reads.append(1) or real(*a))
    monkeypatch.setenv("LETHE_REDIS_URL", scratch_redis_url())  # no worker: it stays queued
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as c:
            job_id = c.post("/generate", json={"prompt": "a", "steps": 2}).json()["id"]
            t0 = time.monotonic()
            assert c.get(f"/jobs/{job_id}", params={"wait": 3}).json()["status"] == "queued"
            assert 3 <= time.monotonic() - t0 < 6
            c.delete(f"/jobs/{job_id}")
    finally:
        get_settings.cache_clear()
    assert len(reads) <= 16, len(reads)  # 150 at one read every 20 ms
