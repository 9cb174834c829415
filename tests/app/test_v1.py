"""The OpenAI-compatible routes, driven by the official `openai` package."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from openai import (
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    OpenAI,
)
from PIL import Image

from tests.support import KEYS, SHARED_KEYS, served, wait_job

FAST = {"steps": 2}


@pytest.fixture
def openai_client(live_url, worker):
    # No retries: a test sees the first answer, as a user's retry would not change it.
    with OpenAI(base_url=f"{live_url}/v1", api_key="any", max_retries=0) as client:
        yield client


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_images_generate_gives_n_pngs_of_the_size_asked(openai_client, response_format):
    r = openai_client.images.generate(prompt="a red circle", n=2, size="64x48",
                                      model="tiny-sd", response_format=response_format,
                                      user="end-user-7", extra_body=FAST)
    assert len(r.data) == 2 and r.created > 0
    for item in r.data:
        if response_format == "b64_json":
            data = base64.b64decode(item.b64_json)
        else:  # a signed link: fetched with no key, as a browser showing it would
            assert item.url.startswith("http://127.0.0.1:") and "/files/jobs/" in item.url
            got = httpx.get(item.url)
            assert got.status_code == 200 and got.headers["content-type"] == "image/png"
            data = got.content
        assert png(data).size == (64, 48)


def test_the_same_seed_draws_the_same_pixels_as_post_generate(openai_client, http):
    r = openai_client.images.generate(prompt="a blue square", size="64x64", model="tiny-sd",
                                      response_format="b64_json",
                                      extra_body={**FAST, "seed": 11})
    via_openai = np.asarray(png(base64.b64decode(r.data[0].b64_json)))
    job = wait_job(http, http.post("/generate", json={
        "prompt": "a blue square", "width": 64, "height": 64, "model": "tiny-sd",
        "seed": 11, **FAST}).json()["id"])
    native = np.asarray(png(http.get(job["result"]["images"][0]["url"]).content))
    assert via_openai.shape == native.shape and np.array_equal(via_openai, native)
    assert http.get(f"/jobs/{r.job_id}").json()["params"]["seed"] == 11


def test_models_list_in_openais_shape(openai_client):
    listed = {m.id: m for m in openai_client.models.list()}
    assert {"shapes-sd", "tiny-sd"} <= set(listed)
    assert "shapes-x4" not in listed and "shapes-clf" not in listed  # not text-to-image
    assert listed["shapes-sd"].object == "model" and listed["shapes-sd"].owned_by == "lethe"
    assert openai_client.models.retrieve("shapes-sd").id == "shapes-sd"
    with pytest.raises(NotFoundError):
        openai_client.models.retrieve("shapes-x4")


@pytest.mark.parametrize("fields, param, words", [
    ({"size": "big"}, "size", "`size` must be '<width>x<height>'"),
    ({"size": "65x64"}, "size", "multiple of 8, got '65x64'"),
    ({"size": "64x4096"}, "size", "got '64x4096'"),
    ({"n": 9}, "n", "`n`"),
    ({"response_format": "gif"}, "response_format", "`response_format`"),
    ({"extra_body": {"stepz": 3}}, "stepz", "`stepz`"),
])
def test_a_bad_field_raises_bad_request_naming_it(openai_client, fields, param, words):
    with pytest.raises(BadRequestError) as caught:
        openai_client.images.generate(**{"prompt": "a", "model": "tiny-sd", **fields})
    assert caught.value.status_code == 400
    assert words in caught.value.message
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"


def test_an_unknown_model_is_not_found(openai_client):
    with pytest.raises(NotFoundError) as caught:
        openai_client.images.generate(prompt="a", model="dall-e-3")
    assert caught.value.code == "model_not_found" and "dall-e-3" in caught.value.message


def test_keys_work_as_bearer_and_a_wrong_one_is_an_authentication_error(worker):
    with served(LETHE_API_KEYS=SHARED_KEYS) as url:
        with OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as client, \
                pytest.raises(AuthenticationError) as caught:
            client.models.list()
        assert caught.value.code == "invalid_api_key"
        with OpenAI(base_url=f"{url}/v1", api_key=KEYS["alice"], max_retries=0) as client:
            assert "shapes-sd" in [m.id for m in client.models.list()]
            r = client.images.generate(prompt="a", size="64x64", model="tiny-sd",
                                       extra_body=FAST)
        # The link works without the key; altered or expired, it does not.
        assert httpx.get(r.data[0].url).status_code == 200
        forged = r.data[0].url.replace("/images/0?", "/images/1?")
        assert httpx.get(forged).status_code in (403, 404)
        tampered = r.data[0].url[:-3] + ("AAA" if not r.data[0].url.endswith("AAA") else "BBB")
        answer = httpx.get(tampered)
        assert answer.status_code == 403 and "`signature`" in answer.json()["error"]["message"]
        # The job is alice's like any other.
        assert httpx.get(f"{url}/jobs/{r.job_id}",
                         headers={"Authorization": f"Bearer {KEYS['alice']}"}).json()[
            "owner"] == "alice"


def test_a_job_outlasting_the_wait_names_itself_and_is_not_retried(worker):
    with served(LETHE_OPENAI_WAIT_S="0.5") as url, \
            OpenAI(base_url=f"{url}/v1", api_key="any", max_retries=2) as client:
        with pytest.raises(InternalServerError) as caught:
            client.images.generate(prompt="a", size="64x64", model="tiny-sd",
                                   extra_body={"steps": 500})
        assert caught.value.status_code == 504
        assert caught.value.code == "job_still_running"
        message = caught.value.message
        assert "poll GET /jobs/" in message
        job_id = message.split("job ")[1].split()[0]
        # One job, though the client allows retries: the answer said not to.
        listed = httpx.get(f"{url}/jobs", params={"limit": 5}).json()["data"]
        assert [j["id"] for j in listed].count(job_id) == 1
        assert sum(j["params"]["steps"] == 500 and j["status"] in ("queued", "running")
                   for j in listed) == 1
        assert httpx.delete(f"{url}/jobs/{job_id}").status_code == 202
