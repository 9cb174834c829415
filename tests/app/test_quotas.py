"""Limits per key, counted in Redis: requests a minute, jobs queued + running at once,
images a day; over one, a 429 with Retry-After and a message naming the limit."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from redis import Redis

from app import jobindex
from tests.support import SHARED_KEYS, bearer, served, wait_job

TINY = {"prompt": "a", "steps": 1, "width": 64, "height": 64}


def _limited(r: httpx.Response, names: str) -> int:
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "rate_limited"
    assert names in r.json()["error"]["message"]
    return int(r.headers["Retry-After"])


def test_the_request_past_the_limit_in_a_minute_is_a_429_with_retry_after(worker):
    with served(LETHE_API_KEYS=SHARED_KEYS, LETHE_RATE_LIMIT_PER_MINUTE="5") as url, \
            httpx.Client(base_url=url) as http:
        for _ in range(5):
            assert http.get("/models", headers=bearer("alice")).status_code == 200
        wait_s = _limited(http.get("/models", headers=bearer("alice")),
                          "at most 5 requests a minute per key")
        assert 1 <= wait_s <= 60
        # Every route counts, jobs too; other keys and the open routes do not.
        _limited(http.post("/generate", json=TINY, headers=bearer("alice")), "5 requests")
        assert http.get("/models", headers=bearer("bob")).status_code == 200
        assert http.get("/healthz").status_code == 200


def test_queued_plus_running_never_exceeds_the_limit_under_16_clients(worker, redis: Redis):
    limit, clients, wanted = 3, 16, 2
    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        # One transaction: every status of the owner's jobs at one instant.
        while not stop.is_set():
            ids = [m.decode() for m in redis.zrange(jobindex.owner_key("alice"), 0, -1)]
            with redis.pipeline(transaction=True) as pipe:
                for job_id in ids:
                    pipe.hget(f"rq:job:{job_id}", "status")
                statuses = pipe.execute()
            seen.append(sum(s in (b"queued", b"started") for s in statuses))
            time.sleep(0.005)

    codes: list[int] = []
    accepted: list[str] = []

    with served(LETHE_API_KEYS=SHARED_KEYS, LETHE_MAX_ACTIVE_JOBS=str(limit)) as url:
        def client() -> None:
            # Each client keeps submitting until two of its jobs were taken: the limit is
            # hit again and again as jobs end and places free up.
            mine = 0
            deadline = time.monotonic() + 60
            with httpx.Client(base_url=url, timeout=60, headers=bearer("alice")) as http:
                while mine < wanted and time.monotonic() < deadline:
                    r = http.post("/generate", json={**TINY, "steps": 3})
                    codes.append(r.status_code)
                    if r.status_code == 202:
                        accepted.append(r.json()["id"])
                        mine += 1
                    else:
                        _limited(r, "at most 3 jobs queued or running at once")
                        time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with httpx.Client(base_url=url, timeout=60, headers=bearer("alice")) as http:
            for job_id in accepted:
                assert wait_job(http, job_id)["status"] == "succeeded"
            # Places come back as jobs end: a new job is accepted again.
            assert http.post("/generate", json=TINY).status_code == 202
        stop.set()
        sampler.join()
    print(f"{len(seen)} samples, most at once {max(seen)}; {codes.count(202)} accepted, "
          f"{codes.count(429)} refused")
    assert len(accepted) == clients * wanted and set(codes) == {202, 429}
    assert len(seen) > 50 and max(seen) <= limit
    assert max(seen) >= 2  # the limit was reached for, not idle


def test_images_a_day_count_what_each_job_asks_for(worker):
    with served(LETHE_API_KEYS=SHARED_KEYS, LETHE_MAX_IMAGES_PER_DAY="3") as url, \
            httpx.Client(base_url=url, headers=bearer("dave")) as http:
        assert http.post("/generate", json={**TINY, "num_images": 2}).status_code == 202
        r = http.post("/generate", json={**TINY, "num_images": 2})
        wait_s = _limited(r, "at most 3 images a day per key")
        assert "1 left today, 2 asked" in r.json()["error"]["message"]
        assert 1 <= wait_s <= 24 * 3600
        assert http.post("/generate", json={**TINY, "num_images": 1}).status_code == 202
        _limited(http.post("/generate", json=TINY), "images a day")
        # Another key's day is its own.
        assert http.post("/generate", json=TINY, headers=bearer("alice")).status_code == 202


@pytest.mark.parametrize("limit", ["-1", "many"])
def test_a_bad_limit_setting_is_refused_naming_it(limit):
    from pydantic import ValidationError

    from app.config import Settings

    with pytest.raises(ValidationError, match="max_active_jobs"):
        Settings(max_active_jobs=limit)


def test_a_job_reserved_twice_holds_one_place(scratch_redis: Redis):
    """An upload holds its place before its bytes arrive, then submits the same job."""
    from app import quotas
    from app.errors import RateLimited

    assert quotas.reserve_job(scratch_redis, "erin", "job-1", 1)
    assert quotas.reserve_job(scratch_redis, "erin", "job-1", 1)
    with pytest.raises(RateLimited, match="LETHE_MAX_ACTIVE_JOBS"):
        quotas.reserve_job(scratch_redis, "erin", "job-2", 1)
