"""Idempotency-Key: a retried submission answers with the first one's job, never a second
training; the same key with another body is a 409."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.support import SHARED_KEYS, bearer, served

ERASE = {"base_model": "tiny-sd", "concepts": ["green"], "iterations": 500,
         "name": "tiny-no-green-once"}


@pytest.fixture(scope="module")
def shared(worker):
    with served(LETHE_API_KEYS=SHARED_KEYS, LETHE_MAX_IMAGES_PER_DAY="3") as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        yield http


def test_twenty_concurrent_identical_erases_with_one_key_make_one_job(shared):
    url = str(shared.base_url)
    answers: list[httpx.Response] = []
    start = threading.Barrier(20)

    def submit() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            start.wait()
            answers.append(http.post("/erase", json=ERASE, headers={
                **bearer("carol"), "Idempotency-Key": "erase-green-1"}))

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in answers] == [202] * 20, [r.text for r in answers]
    ids = {r.json()["id"] for r in answers}
    assert len(ids) == 1
    replays = [r.headers.get("Idempotent-Replayed") for r in answers]
    assert replays.count("true") == 19 and replays.count(None) == 1
    listed = shared.get("/jobs", params={"type": "erase"}, headers=bearer("carol")).json()
    assert [j["id"] for j in listed["data"]] == list(ids)
    # A retry later still answers with that job...
    again = shared.post("/erase", json=ERASE, headers={**bearer("carol"),
                                                       "Idempotency-Key": "erase-green-1"})
    assert again.status_code == 202 and again.json()["id"] in ids
    # ... another body under the same key is a client's bug...
    r = shared.post("/erase", json={**ERASE, "iterations": 400},
                    headers={**bearer("carol"), "Idempotency-Key": "erase-green-1"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_conflict"
    assert "Idempotency-Key" in r.json()["error"]["message"]
    # ... and another key's same key is its own.
    r = shared.post("/erase", json={**ERASE, "name": "tiny-no-green-bob"},
                    headers={**bearer("bob"), "Idempotency-Key": "erase-green-1"})
    assert r.status_code == 202 and r.json()["id"] not in ids
    for job_id, who in ((ids.pop(), "carol"), (r.json()["id"], "bob")):
        assert shared.delete(f"/jobs/{job_id}", headers=bearer(who)).status_code == 202


def test_a_refused_submission_does_not_hold_its_key(shared):
    body = {"prompt": "a", "steps": 1, "width": 64, "height": 64, "num_images": 4}
    headers = {**bearer("bob"), "Idempotency-Key": "gen-4"}
    for _ in range(2):  # over the day's 3 images: refused each time, never replayed
        r = shared.post("/generate", json=body, headers=headers)
        assert r.status_code == 429, r.text
    r = shared.post("/generate", json={**body, "num_images": 1}, headers=headers)
    assert r.status_code == 202 and "Idempotent-Replayed" not in r.headers


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "ключ".encode()])
def test_a_bad_idempotency_key_is_a_422_naming_the_header(shared, key):
    r = shared.post("/generate", json={"prompt": "a"},
                    headers={**bearer("carol"), "Idempotency-Key": key})
    assert r.status_code == 422, r.text
    assert "`Idempotency-Key` header must be 1 to 255 visible ASCII" in r.json()["error"][
        "message"]
