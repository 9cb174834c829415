"""Helpers for tests: job specs, and waiting for jobs through the client (the live server
and workers come from ``app.testing``, which the benchmarks use too)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from app.client import FINISHED, JobWaitTimeout, LetheClient
from app.jobspecs import GenerateJob
from app.testing import LiveServer, environment

# Keys of a service shared by users and an operator (carol and dave: tests whose counts
# must start from zero, a user of their own each).
KEYS = {"alice": "ka-5ecret", "bob": "kb-5ecret", "carol": "kc-5ecret", "dave": "kd-5ecret",
        "root": "kr-5ecret"}
SHARED_KEYS = ",".join([*(f"{name}:{key}" for name, key in KEYS.items() if name != "root"),
                        f"root:{KEYS['root']}:admin"])


def own_storage() -> dict[str, str]:
    """Settings for a test that builds a fresh service state of its own: in a session on
    S3 (LETHE_TEST_STORAGE=s3) a prefix of its own in the session's bucket; otherwise
    nothing, its own LETHE_HOME being enough."""
    import uuid

    url = os.environ.get("LETHE_STORAGE_URL")
    return {"storage_url": f"{url}-{uuid.uuid4().hex[:8]}"} if url else {}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@contextmanager
def served(**env: str) -> Iterator[str]:
    """The real API on loopback, built with these ``LETHE_*`` settings on top of the
    session's; the session's worker runs its jobs. Yields its URL."""
    import app.main  # noqa: F401  (its module-level app is built now, with the session's)

    with environment(**env), LiveServer(fresh=True) as server:
        yield server.url


def generate_spec(**fields) -> GenerateJob:
    """A small generate job as the API would queue it (tiny-sd, 64×64, one step)."""
    return GenerateJob(**{"prompt": "a", "model": "tiny-sd", "num_images": 1, "steps": 1,
                          "guidance_scale": 5.0, "width": 64, "height": 64,
                          "scheduler": "ddim", "seed": 1, **fields})


def wait_job(http, job_id: str, timeout_s: float = 60, until=FINISHED) -> dict:
    """``LetheClient.wait`` over the test's httpx client, the job as the JSON the service
    sent (tests read it as a user of the HTTP API would); a job still short of ``until``
    after ``timeout_s`` fails the test."""
    try:
        job = LetheClient(http=http).wait(job_id, timeout_s=timeout_s, until=until)
    except JobWaitTimeout as late:
        raise AssertionError(f"job {job_id} still {late.job.status} after {timeout_s}s: "
                             f"{late.job}") from None
    return job.model_dump(mode="json")


def until_progress(http, job_id: str, reached) -> dict:
    """The job's first progress that ``reached(progress)`` accepts, followed on its event
    stream through the SDK; the job ending first fails the test."""
    for event in LetheClient(http=http).events(job_id):
        if event.job is not None:
            raise AssertionError(f"job {job_id} ended {event.job.status} first: {event.job}")
        if event.event == "progress" and reached(event.data):
            return event.data
    raise AssertionError(f"the event stream of job {job_id} ended early")
