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
from tests.support import generate_spec


@pytest.fixture
def scratch(scratch_redis, tmp_path):
    return scratch_redis, Settings(home=tmp_path)


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

