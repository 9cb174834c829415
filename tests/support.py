"""Helpers for tests: job specs, and waiting for jobs through the client (the live server
and workers come from ``app.testing``, which the benchmarks use too)."""

from __future__ import annotations

from app.client import FINISHED, JobWaitTimeout, LetheClient
from app.jobspecs import GenerateJob


def generate_spec(**fields) -> GenerateJob:
    """A small generate job as the API would queue it (tiny-sd, 64×64, one step)."""
    return GenerateJob(**{"prompt": "a", "model": "tiny-sd", "num_images": 1, "steps": 1,
                          "guidance_scale": 5.0, "width": 64, "height": 64,
                          "scheduler": "ddim", "seed": 1, **fields})


def wait_job(http, job_id: str, timeout_s: float = 60, until=FINISHED) -> dict:
    """``LetheClient.wait`` over the test's httpx client; a job still short of ``until``
    after ``timeout_s`` fails the test."""
    try:
        return LetheClient(http=http).wait(job_id, timeout_s=timeout_s, until=until)
    except JobWaitTimeout as late:
        raise AssertionError(f"job {job_id} still {late.job['status']} after {timeout_s}s: "
                             f"{late.job}") from None
