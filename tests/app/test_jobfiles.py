"""The files a job leaves: the sweep removes those of ended or expired jobs, and no others."""

from __future__ import annotations

import os
import time

import pytest
from redis import Redis
from rq.job import JobStatus

from app import jobfiles
from app.config import Settings
from app.queue import enqueue
from tests.support import generate_spec, own_storage


@pytest.fixture
def scratch(scratch_redis, tmp_path):
    return scratch_redis, Settings(home=tmp_path, **own_storage())


def files_of(settings: Settings, job_id: str, checkpoint: bool = False, age_s: float = 600
             ) -> None:
    out = jobfiles.output_dir(settings, job_id)
    out.mkdir(parents=True)
    (out / "0.png").write_bytes(b"png")
    paths = [out]
    if checkpoint:
        ckpt = jobfiles.checkpoint_path(settings, job_id)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(b"ckpt")
        paths.append(ckpt)
    then = time.time() - age_s
    for p in paths:
        os.utime(p, (then, then))


def job_in(redis: Redis, status: JobStatus) -> str:
    job = enqueue(redis, "generate", generate_spec(), timeout_s=60, result_ttl_s=600)
    job.set_status(status)
    return job.id


def test_sweep_keeps_live_and_succeeded_jobs_and_removes_the_rest(scratch):
    redis, settings = scratch
    queued, running = job_in(redis, JobStatus.QUEUED), job_in(redis, JobStatus.STARTED)
    done, failed = job_in(redis, JobStatus.FINISHED), job_in(redis, JobStatus.FAILED)
    canceled = job_in(redis, JobStatus.CANCELED)
    gone = "0f0e8d6c-0000-4000-8000-000000000000"  # its record expired
    for job_id in (queued, running, failed, canceled, gone):
        files_of(settings, job_id, checkpoint=True)
    files_of(settings, done, checkpoint=True)
    young = "11111111-0000-4000-8000-000000000000"  # an upload not queued yet
    files_of(settings, young, age_s=0)

    removed = jobfiles.sweep(redis, settings)

    assert sorted(removed) == sorted([failed, canceled, gone, done])
    for job_id in (queued, running):
        assert jobfiles.output_dir(settings, job_id).is_dir()
        assert jobfiles.checkpoint_path(settings, job_id).is_file()
    for job_id in (failed, canceled, gone):
        assert not jobfiles.output_dir(settings, job_id).exists()
        assert not jobfiles.checkpoint_path(settings, job_id).exists()
    # A succeeded job keeps its images; a checkpoint left beside them goes.
    assert (jobfiles.output_dir(settings, done) / "0.png").is_file()
    assert not jobfiles.checkpoint_path(settings, done).exists()
    assert jobfiles.output_dir(settings, young).is_dir()
    assert jobfiles.sweep(redis, settings) == []



def test_sweep_spares_a_folder_whose_upload_is_still_being_written(scratch):
    redis, settings = scratch
    streaming = "22222222-0000-4000-8000-000000000000"
    files_of(settings, streaming)  # made ten minutes ago, no job yet...
    (jobfiles.output_dir(settings, streaming) / "0.png").write_bytes(b"more")  # ...written now
    assert jobfiles.sweep(redis, settings) == []
    assert jobfiles.output_dir(settings, streaming).is_dir()


def test_images_go_with_their_job_record_after_the_result_ttl(worker, home):
    """Retention end to end: a 3 s TTL; the session's worker sweeps every 10 s."""
    import httpx

    from tests.support import served, wait_job

    with served(LETHE_RESULT_TTL_S="3") as url, httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/generate", json={"prompt": "a", "steps": 1, "width": 64, "height": 64})
        job = wait_job(http, r.json()["id"])
        assert job["status"] == "succeeded"
        folder = home / "outputs" / job["id"]
        assert (folder / job["result"]["images"][0]["file"]).is_file()
        ended = time.monotonic()
        deadline = ended + 60
        while folder.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        gone_s = time.monotonic() - ended
        assert not folder.exists(), "the images outlived their job record by a minute"
        r = http.get(f"/jobs/{job['id']}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
        assert http.get(f"/jobs/{job['id']}/images/0").status_code == 404
    print(f"images removed {gone_s:.1f} s after the job ended (TTL 3 s)")


def test_purge_removes_a_finished_jobs_images_at_once(http, home):
    from tests.support import wait_job

    r = http.post("/generate", json={"prompt": "a", "steps": 1, "width": 64, "height": 64})
    job_id = r.json()["id"]
    wait_job(http, job_id)
    assert (home / "outputs" / job_id).is_dir()
    assert http.delete(f"/jobs/{job_id}", params={"purge": "true"}).status_code == 204
    assert not (home / "outputs" / job_id).exists()
    assert http.get(f"/jobs/{job_id}").status_code == 404
    assert job_id not in [j["id"] for j in http.get("/jobs").json()["data"]]


def test_purging_a_running_job_is_a_409(http):
    r = http.post("/erase", json={"base_model": "tiny-sd", "concepts": ["red"],
                                  "iterations": 500, "name": "tiny-purge-refused"})
    job_id = r.json()["id"]
    r = http.delete(f"/jobs/{job_id}", params={"purge": "true"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_finished"
    assert "cancel it first" in r.json()["error"]["message"]
    assert http.delete(f"/jobs/{job_id}").status_code == 202  # cancel
