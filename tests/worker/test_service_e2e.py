"""End to end over real HTTP: API (uvicorn) -> Redis -> worker process -> PNG."""

from __future__ import annotations

import io
import os
import signal
import time

import pytest
from PIL import Image

from app.testing import start_worker, stop_worker
from tests.support import generate_spec, until_progress, wait_job

pytestmark = pytest.mark.slow


def generate(http, **body) -> str:
    body = {"prompt": "a red circle", "model": "tiny-sd", "steps": 2, "seed": 7, **body}
    r = http.post("/generate", json=body)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/jobs/{r.json()['id']}"
    return r.json()["id"]


def png(http, job_id: str, index: int = 0) -> bytes:
    r = http.get(f"/jobs/{job_id}/images/{index}")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return r.content


def test_generate_poll_download_and_repeat_is_byte_identical(http):
    first = wait_job(http, generate(http, width=48, height=32))
    assert first["status"] == "succeeded", first
    assert first["progress"]["step"] == first["progress"]["total"] == 2
    image = Image.open(io.BytesIO(png(http, first["id"])))
    assert image.size == (48, 32) and image.mode == "RGB"

    again = wait_job(http, generate(http, width=48, height=32))
    other_seed = wait_job(http, generate(http, width=48, height=32, seed=8))
    assert png(http, again["id"]) == png(http, first["id"])
    assert png(http, other_seed["id"]) != png(http, first["id"])
    # The model stayed in the worker's cache after the first job.
    assert again["result"]["cached"] is True


def test_long_polling_answers_once_the_job_has_finished(http):
    job_id = generate(http, steps=40, width=64, height=64)
    t0 = time.monotonic()
    job = http.get(f"/jobs/{job_id}", params={"wait": 20}).json()
    assert job["status"] == "succeeded", job  # one request, not a polling loop
    assert time.monotonic() - t0 < 20
    # A finished job answers at once; the bound on `wait` is checked like any field.
    t0 = time.monotonic()
    assert http.get(f"/jobs/{job_id}", params={"wait": 20}).json()["status"] == "succeeded"
    assert time.monotonic() - t0 < 1
    r = http.get(f"/jobs/{job_id}", params={"wait": 31})
    assert r.status_code == 422 and "wait" in r.json()["error"]["message"]


def test_many_long_polls_leave_the_other_routes_answering(http, live_url):
    import threading

    import httpx

    slow = generate(http, steps=400, width=64, height=64)
    answers = []

    def poll() -> None:
        with httpx.Client(base_url=live_url, timeout=30) as c:
            answers.append(c.get(f"/jobs/{slow}", params={"wait": 8}).status_code)

    pollers = [threading.Thread(target=poll) for _ in range(48)]  # past anyio's 40 threads
    for t in pollers:
        t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    assert http.get("/models").status_code == 200
    assert http.get(f"/jobs/{slow}").status_code == 200
    assert time.monotonic() - t0 < 2
    http.delete(f"/jobs/{slow}")  # the polls answer as soon as the job has stopped
    for t in pollers:
        t.join(15)
    assert answers == [200] * 48


def test_each_image_of_a_batch_depends_only_on_its_own_seed(http):
    batch = wait_job(http, generate(http, num_images=2, seed=100))
    single = wait_job(http, generate(http, seed=101))
    assert [i["seed"] for i in batch["result"]["images"]] == [100, 101]
    assert png(http, batch["id"], 1) == png(http, single["id"])
    r = http.get(f"/jobs/{batch['id']}/images/2")
    assert r.status_code == 404 and "`index`" in r.json()["error"]["message"]


def test_cancel_running_job_stops_within_two_steps(http):
    job_id = generate(http, steps=200, width=64, height=64)
    until_progress(http, job_id, lambda p: p["step"] >= 3)
    t0 = time.monotonic()
    before = http.get(f"/jobs/{job_id}").json()["progress"]["step"]
    assert http.delete(f"/jobs/{job_id}").status_code == 202
    done = wait_job(http, job_id, timeout_s=30)
    elapsed = time.monotonic() - t0
    assert done["status"] == "canceled", done
    assert done["error"]["code"] == "canceled"
    stopped_at = done["progress"]["step"]
    assert stopped_at < 200
    print(f"cancel: step {before} when asked, stopped at {stopped_at}, {elapsed:.2f}s")
    assert stopped_at - before <= 3, (before, stopped_at, elapsed)


def test_cancel_queued_job_never_runs(http, redis):
    # A long job occupies the only worker, so the next one waits in the queue.
    blocker = generate(http, steps=200, width=64, height=64)
    wait_job(http, blocker, until=("running",))
    queued = generate(http)
    assert http.get(f"/jobs/{queued}").json()["status"] == "queued"
    assert http.delete(f"/jobs/{queued}").json()["status"] == "canceled"
    http.delete(f"/jobs/{blocker}")
    wait_job(http, blocker)
    follow = wait_job(http, generate(http))  # the worker moved past the canceled one
    assert follow["status"] == "succeeded"
    job = http.get(f"/jobs/{queued}").json()
    assert job["status"] == "canceled" and job["started_at"] is None
    assert not (http.get(f"/jobs/{queued}/images/0").status_code == 200)


def test_two_workers_on_one_redis_both_take_jobs(http, home):
    second = start_worker("test-second", queues="images", log=home / "worker-second.log")
    try:
        ids = [generate(http, steps=10, seed=s) for s in range(6)]
        done = [wait_job(http, i, timeout_s=120) for i in ids]
        assert all(d["status"] == "succeeded" for d in done)
        workers = {d["result"]["worker"] for d in done}
        assert workers == {"test-main", "test-second"}, workers
    finally:
        stop_worker(second)


def test_killed_worker_fails_its_job_and_a_restarted_worker_serves(http, home, worker):
    # Stop the session worker so the job lands on the one we kill.
    stop_worker(worker.proc)
    victim = start_worker("test-victim", queues="images", log=home / "worker-victim.log")
    job_id = generate(http, steps=400, width=64, height=64)
    wait_job(http, job_id, until=("running",))
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    t0 = time.monotonic()
    failed = wait_job(http, job_id, timeout_s=30)
    detected_s = time.monotonic() - t0
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "worker_lost"
    print(f"kill -9 -> failed in {detected_s:.1f}s")
    assert detected_s <= 3 + 2, detected_s  # heartbeat TTL (3 s in tests) plus slack
    worker.proc = start_worker("test-main", log=home / "worker-main.log")
    assert wait_job(http, generate(http))["status"] == "succeeded"


def test_job_past_its_timeout_fails_with_code_timeout(http, redis):
    from app.queue import enqueue

    job = enqueue(redis, "generate", generate_spec(steps=500), timeout_s=1, result_ttl_s=600)
    done = wait_job(http, job.id, timeout_s=60)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "timeout" and "1s" in done["error"]["message"]
    assert done["progress"]["step"] < 500


def test_a_job_the_worker_cannot_read_fails_naming_the_field(http, redis):
    # What a worker older than the API would meet: a field it does not know. It refuses
    # the job rather than run something other than what was asked.
    from rq import Queue

    params = generate_spec().queued() | {"sharpness": 3}
    job = Queue("images", connection=redis).enqueue("worker.jobs.generate", params=params)
    failed = wait_job(http, job.id)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "invalid_params"
    assert "sharpness" in failed["error"]["message"], failed["error"]


def test_generate_without_seed_draws_one_and_reports_it(http):
    r = http.post("/generate", json={"prompt": "a blue square", "model": "tiny-sd", "steps": 2})
    job = wait_job(http, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert isinstance(job["params"]["seed"], int)
    assert job["result"]["images"][0]["seed"] == job["params"]["seed"]
