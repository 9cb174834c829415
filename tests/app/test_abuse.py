"""A shared deployment read as an attacker would (issue 33): what one key can do to the
service or to another key's work, each over real HTTP with the session's worker."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import session_registry
from tests.support import SHARED_KEYS, bearer, served, wait_job

pytestmark = pytest.mark.slow

SINGLE_FILE_16 = {"format": "single-file", "dtype": "float16"}


def _forget_export(model: str, params: dict) -> None:
    """The export as never made, so this test's request is the one that makes it."""
    from app import exports

    registry = session_registry()
    manifest = registry.get(model)
    dtype, rank, layout = exports.resolve(manifest, params["format"], params.get("dtype"),
                                          None)
    registry._drop_export(model, exports.file_name(manifest, params["format"], dtype, rank,
                                                   layout))


def test_anothers_canceled_export_never_cancels_mine(worker):
    """Finding 6: the first requester of an export could cancel it for everyone, for the
    week its cancel flag outlived the job."""
    _forget_export("tiny-sd", SINGLE_FILE_16)
    with served(LETHE_API_KEYS=SHARED_KEYS) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        r = http.get("/models/tiny-sd/download", params=SINGLE_FILE_16,
                     headers=bearer("alice"))
        assert r.status_code == 202, r.text
        first = r.json()["id"]
        assert http.delete(f"/jobs/{first}", headers=bearer("alice")).status_code == 202
        # Bob's request is his own job, which alice can neither see nor cancel.
        r = http.get("/models/tiny-sd/download", params=SINGLE_FILE_16, headers=bearer("bob"))
        assert r.status_code == 202, r.text
        mine = r.json()["id"]
        assert mine != first
        assert http.delete(f"/jobs/{mine}", headers=bearer("alice")).status_code == 404
        http.headers.update(bearer("bob"))
        assert wait_job(http, mine, timeout_s=120)["status"] == "succeeded"
        r = http.get("/models/tiny-sd/download", params=SINGLE_FILE_16)
        assert r.status_code == 200 and len(r.content) > 1000
        # Alice asks again once her canceled job has ended: her cancel did not outlive it.
        _forget_export("tiny-sd", SINGLE_FILE_16)
        http.headers.update(bearer("alice"))
        wait_job(http, first)
        r = http.get("/models/tiny-sd/download", params=SINGLE_FILE_16)
        assert r.status_code == 202, r.text
        assert wait_job(http, r.json()["id"], timeout_s=120)["status"] == "succeeded"


def test_exports_count_against_the_callers_jobs(worker):
    """Finding 2: exports were queued beside the quotas, so any key could fill the train
    queue with them."""
    with served(LETHE_API_KEYS=SHARED_KEYS, LETHE_MAX_ACTIVE_JOBS="1") as url, \
            httpx.Client(base_url=url, timeout=60, headers=bearer("carol")) as http:
        for dtype in ("float32", "float16"):
            _forget_export("tiny-sd", {"format": "diffusers", "dtype": dtype})
        r = http.get("/models/tiny-sd/download", params={"format": "diffusers"})
        assert r.status_code == 202, r.text
        r2 = http.get("/models/tiny-sd/download",
                      params={"format": "diffusers", "dtype": "float16"})
        assert r2.status_code == 429, r2.text
        assert "LETHE_MAX_ACTIVE_JOBS" in r2.json()["error"]["message"]
        wait_job(http, r.json()["id"], timeout_s=120)


def test_only_a_models_owner_or_an_admin_adds_to_its_reports(worker):
    """Finding 8: any key's evaluation was appended to any model's manifest."""
    body = {"model": "shapes-sd", "prompts": ["a red circle"], "images_per_prompt": 1,
            "steps": 2, "metrics": ["accuracy"]}
    with served(LETHE_API_KEYS=SHARED_KEYS) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        def reports() -> list:
            return http.get("/models/shapes-sd", headers=bearer("bob")).json().get(
                "reports", [])

        before = reports()
        http.headers.update(bearer("bob"))
        job = wait_job(http, http.post("/evaluate", json=body).json()["id"], timeout_s=300)
        assert job["status"] == "succeeded" and job["result"]["report"]["metrics"]
        assert reports() == before  # bob reads his report in his job only
        http.headers.update(bearer("root"))
        job = wait_job(http, http.post("/evaluate", json=body).json()["id"], timeout_s=300)
        assert [r["job"] for r in reports()][-1] == job["id"]


def test_event_streams_and_long_polls_are_bounded_per_key_and_in_all(tiny_model, scratch_redis):
    """Finding 7: each event stream and long poll holds a Redis connection, with no bound
    per caller (a queued job's stream never ends). Jobs here are queued on a database no
    worker reads, so they stay queued."""
    from tests.conftest import scratch_redis_url

    with served(LETHE_API_KEYS=SHARED_KEYS, LETHE_REDIS_URL=scratch_redis_url(),
                LETHE_MAX_HOLDS_PER_KEY="2", LETHE_MAX_HOLDS="3") as url, \
            httpx.Client(base_url=url, timeout=10) as http:  # a stream not refused: times out
        ids = {}
        for name in ("alice", "bob"):
            r = http.post("/generate", json={"prompt": "a red circle"}, headers=bearer(name))
            assert r.status_code == 202, r.text
            ids[name] = r.json()["id"]

        def stream(name: str):
            return http.stream("GET", f"/jobs/{ids[name]}/events", headers=bearer(name))

        with stream("alice") as a1, stream("alice") as a2:
            assert a1.status_code == a2.status_code == 200
            r = http.get(f"/jobs/{ids['alice']}/events", headers=bearer("alice"))
            assert r.status_code == 429 and "LETHE_MAX_HOLDS_PER_KEY" in r.text, r.text
            r = http.get(f"/jobs/{ids['alice']}", params={"wait": 5}, headers=bearer("alice"))
            assert r.status_code == 429, r.text
            with stream("bob") as b1:
                assert b1.status_code == 200
                r = http.get(f"/jobs/{ids['bob']}", params={"wait": 5}, headers=bearer("bob"))
                assert r.status_code == 503 and "LETHE_MAX_HOLDS" in r.text, r.text
                # What holds nothing is answered as ever.
                assert http.get(f"/jobs/{ids['bob']}", headers=bearer("bob")).status_code == 200
        # Closed streams give their places back.
        r = http.get(f"/jobs/{ids['alice']}", params={"wait": 0.5}, headers=bearer("alice"))
        assert r.status_code == 200 and r.json()["status"] == "queued", r.text


def test_a_job_canceled_before_it_ran_leaves_its_record_an_hour(tiny_model, scratch_redis):
    """Finding 7: a canceled job freed its quota place but its record stayed a week, so
    submitting and canceling in a loop filled Redis."""
    from tests.conftest import scratch_redis_url

    with served(LETHE_API_KEYS=SHARED_KEYS, LETHE_REDIS_URL=scratch_redis_url()) as url, \
            httpx.Client(base_url=url, timeout=30, headers=bearer("carol")) as http:
        job_id = http.post("/generate", json={"prompt": "a red circle"}).json()["id"]
        assert http.delete(f"/jobs/{job_id}").status_code == 202
        assert http.get(f"/jobs/{job_id}").json()["status"] == "canceled"
        for key in (f"rq:job:{job_id}", f"lethe:events:{job_id}"):
            assert 0 < scratch_redis.ttl(key) <= 3600, key
        # And however fast it goes, a key keeps its newest 100 such records.
        used = scratch_redis.info("memory")["used_memory"]
        ids = [job_id]
        for _ in range(250):
            ids.append(http.post("/generate", json={"prompt": "a red circle"}).json()["id"])
            assert http.delete(f"/jobs/{ids[-1]}").status_code == 202
        kept = [i for i in ids if scratch_redis.exists(f"rq:job:{i}")]
        assert kept == ids[-100:]
        assert http.get(f"/jobs/{ids[0]}").status_code == 404
        assert http.get(f"/jobs/{ids[-1]}").json()["status"] == "canceled"
        assert scratch_redis.info("memory")["used_memory"] - used < 100 * 20_000


def test_previews_held_in_redis_are_bounded_in_bytes(scratch_redis):
    """Finding 7: a job's preview events were bounded by count (2000), not bytes: a long
    generate with previews every step, at full size, held its every picture."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from app import events
    from worker.previews import png_data_url

    rng = np.random.default_rng(0)
    url = png_data_url(rng.integers(0, 255, (8, 512, 512, 3), dtype=np.uint8))
    shown = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert shown.size == (1024, 128)  # eight previews side by side, each 128 a side
    big = png_data_url(rng.integers(0, 255, (1, 1024, 1024, 3), dtype=np.uint8))
    assert len(big) < 300_000
    for step in range(60):
        events.publish(scratch_redis, "job-previews", "preview",
                       {"step": step, "total": 60, "image": big}, 3600)
        events.publish(scratch_redis, "job-previews", "progress", {"step": step}, 3600)
    kept = events.decode(scratch_redis.xrange(events.key("job-previews")))
    previews = [data["step"] for _, name, data in kept if name == "preview"]
    assert previews == [56, 57, 58, 59]  # the newest few, the progress whole
    assert sum(name == "progress" for _, name, _ in kept) == 60
    assert scratch_redis.memory_usage(events.key("job-previews")) < 5 * len(big)
