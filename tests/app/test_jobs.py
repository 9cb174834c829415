"""Job state as clients see it, from RQ's records."""

from __future__ import annotations

from rq import Queue, SimpleWorker

from app.jobs import describe
from app.queue import enqueue
from tests.support import generate_spec


def test_a_job_rq_finds_stuck_between_queue_and_worker_fails_as_worker_lost(scratch_redis):
    # What RQ's intermediate-queue sweep does to a job a worker took but never started
    # (the worker, or Redis, went away in between).
    redis = scratch_redis
    job = enqueue(redis, "generate", generate_spec(), timeout_s=60, result_ttl_s=600)
    queue = Queue("images", connection=redis)
    SimpleWorker([queue], connection=redis).handle_job_failure(
        job, queue, exc_string="Job was stuck in intermediate queue.")
    job.refresh()
    view = describe(job)
    assert view["status"] == "failed" and view["error"]["code"] == "worker_lost", view
