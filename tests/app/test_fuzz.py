"""Property-based fuzzing of every route from the OpenAPI document: no input gets a 5xx
or an answer the document does not declare.

schemathesis turns each operation of ``/openapi.json`` into a hypothesis strategy of
requests (valid and invalid bodies, paths and queries); each is sent through the ASGI app.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from app.config import get_settings
from tests.conftest import scratch_redis_url


@pytest.fixture(scope="module")
def fuzz_schema(tiny_model):
    # Jobs the fuzzer queues go to a database no worker listens on.
    mp = pytest.MonkeyPatch()
    mp.setenv("LETHE_REDIS_URL", scratch_redis_url())
    # ... so a generation through /v1 waits for its job only briefly, then answers 504.
    mp.setenv("LETHE_OPENAI_WAIT_S", "0.2")
    get_settings.cache_clear()
    from fastapi.testclient import TestClient

    from app.main import create_app

    app = create_app()
    with TestClient(app):  # runs the lifespan: Redis on app.state
        yield schemathesis.openapi.from_asgi("/openapi.json", app)
    mp.undo()
    get_settings.cache_clear()


CONFORMANCE = [checks.not_a_server_error, checks.status_code_conformance,
               checks.content_type_conformance, checks.response_headers_conformance,
               checks.response_schema_conformance]

OPERATIONS = [
    ("POST", "/generate"),
    ("POST", "/erase"),
    ("POST", "/upscale"),
    ("POST", "/evaluate"),
    ("GET", "/jobs"),
    ("GET", "/jobs/{job_id}"),
    ("DELETE", "/jobs/{job_id}"),
    ("GET", "/jobs/{job_id}/images/{index}"),
    ("GET", "/jobs/{job_id}/events"),
    ("GET", "/models"),
    ("GET", "/models/{model_id}"),
    ("DELETE", "/models/{model_id}"),
    ("PATCH", "/models/{model_id}"),
    ("POST", "/models"),
    ("GET", "/models/{model_id}/download"),
    ("GET", "/domains"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/v1/images/generations"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/files/jobs/{job_id}/images/{index}"),
    ("POST", "/webhooks/secret"),
]


def test_fuzz_covers_every_route(fuzz_schema):
    documented = {(r.ok().method.upper(), r.ok().path) for r in fuzz_schema.get_all_operations()}
    assert documented == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_route_answers_5xx(fuzz_schema, method, path):
    operation = fuzz_schema[path][method]
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]

    @given(case=operation.as_strategy(generation_mode=modes[0])
           | operation.as_strategy(generation_mode=modes[1]))
    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        # Besides no 5xx: every answer is one the document declares, in status, content
        # type, headers and body.
        if path == "/readyz":  # no worker listens on the scratch database: 503 is the truth
            response = case.call_and_validate(checks=CONFORMANCE[1:])
            assert response.status_code == 503 and response.json()["workers"] == 0
            return
        if path == "/v1/images/generations":  # no worker: a valid request outwaits its wait
            response = case.call_and_validate(checks=CONFORMANCE[1:])
            if response.status_code >= 500:
                assert response.status_code == 504, response.text
                assert response.json()["error"]["code"] == "job_still_running"
            elif response.status_code >= 400:  # OpenAI's shape: a message and a type
                assert response.json()["error"]["message"] and response.json()["error"]["type"]
            return
        response = case.call_and_validate(checks=CONFORMANCE)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["code"] and error["message"]

    check()


@pytest.fixture(scope="module")
def shared_schema(tiny_model):
    """The API with two users' keys, on a database no worker reads: bob has a private
    model and a job; the fuzzer calls as alice."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.registry import open_registry
    from tests.support import SHARED_KEYS, bearer

    mp = pytest.MonkeyPatch()
    mp.setenv("LETHE_REDIS_URL", scratch_redis_url())
    mp.setenv("LETHE_OPENAI_WAIT_S", "0.2")
    mp.setenv("LETHE_API_KEYS", SHARED_KEYS)
    get_settings.cache_clear()
    registry = open_registry(get_settings())
    tiny = registry.get(tiny_model)
    with registry.create(BOBS_MODEL, {
            "kind": "text-to-image", "format": "delta", "owner": "bob",
            "visibility": "private", "base": {"id": tiny["id"], "digest": tiny["digest"]},
            "edit": {"method": "esd-x", "concepts": ["red"]}}) as staging:
        (staging / "unet_delta.safetensors").write_bytes(b"")
    app = create_app()
    try:
        with TestClient(app) as client:
            r = client.post("/generate", json={"prompt": "a red circle"},
                            headers=bearer("bob"))
            assert r.status_code == 202, r.text
            yield schemathesis.openapi.from_asgi("/openapi.json", app), r.json()["id"], \
                client
    finally:
        registry.force_remove(BOBS_MODEL)
        mp.undo()
        get_settings.cache_clear()


BOBS_MODEL = "bob-private-edit"


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_a_user_fuzzing_every_route_sees_nothing_of_anothers(shared_schema, method, path):
    """Issue 33: schemathesis over the whole API as alice, beside bob's private model and
    job: no 5xx, and no answer names either of them."""
    from tests.support import bearer

    schema, bobs_job, client = shared_schema
    operation = schema[path][method]
    alice = bearer("alice")
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]

    def leaks(text: str) -> bool:
        return BOBS_MODEL in text or bobs_job in text

    @given(case=operation.as_strategy(generation_mode=modes[0])
           | operation.as_strategy(generation_mode=modes[1]))
    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call(headers=alice)
        assert response.status_code < 500 or path in ("/readyz", "/v1/images/generations"), \
            (response.status_code, response.text)
        assert not leaks(response.text), response.text

    check()
    # And named outright: bob's model and job are not there for alice. (A signed link,
    # /files/..., is refused for its missing signature before any job is looked up.)
    for name in ("model_id", "job_id"):
        if "{" + name + "}" in path and not path.startswith("/files/"):
            url = path.replace("{model_id}", BOBS_MODEL).replace("{job_id}", bobs_job) \
                .replace("{index}", "0")
            r = client.request(method, url, headers=alice,
                               json={"visibility": "public"} if method == "PATCH" else None)
            assert r.status_code == 404, (url, r.status_code, r.text)
