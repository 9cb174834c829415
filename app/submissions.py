"""Queueing a job for a caller: the one road every route that creates a job takes.

In order: the ``Idempotency-Key`` (a repeat answers with the first request's job), the
caller's quotas (a place among its queued + running jobs, its images of the day), then the
job itself, owned by the caller and indexed for ``GET /jobs``. Whatever fails on the way
gives back what was taken before it, so a refused or failed submission costs nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from redis import Redis

from app import quotas
from app.accounts import Caller
from app.config import Settings
from app.idempotency import Claim, fingerprint
from app.jobspecs import JobSpec
from app.queue import enqueue


@dataclass(frozen=True)
class Submitter:
    """What a route knows of the request that asks for a job."""

    redis: Redis
    settings: Settings
    caller: Caller
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Submitted:
    id: str
    type: str
    replayed: bool = False  # an earlier request with the same Idempotency-Key queued it


def submit(sub: Submitter, job_type: str, spec: JobSpec, *, request: Any, timeout_s: int,
           images: int = 0, retries: int = 0, webhook: dict[str, Any] | None = None,
           job_id: str | None = None) -> Submitted:
    """Queue ``spec`` as ``job_type`` for ``sub.caller``. ``request`` is what makes two
    requests the same for ``Idempotency-Key`` (JSON-able); ``images``, what the job counts
    against the caller's images of the day."""
    job_id = job_id or str(uuid.uuid4())
    redis, settings, name = sub.redis, sub.settings, sub.caller.name
    claim = None
    if sub.idempotency_key:
        claim = Claim(redis, name, sub.idempotency_key, fingerprint(job_type, request),
                      job_id, settings.idempotency_ttl_s)
        earlier = claim.take()
        if earlier is not None:
            return Submitted(earlier, job_type, replayed=True)
    held, images_key = False, None
    try:
        held = quotas.reserve_job(redis, name, job_id, settings.max_active_jobs)
        images_key = quotas.take_images(redis, name, images, settings.max_images_per_day)
        enqueue(redis, job_type, spec, job_id=job_id, owner=name, timeout_s=timeout_s,
                result_ttl_s=settings.result_ttl_s, retries=retries, webhook=webhook)
    except BaseException:
        if held:
            quotas.release_job(redis, name, job_id)
        quotas.give_back_images(redis, images_key, images)
        if claim is not None:
            claim.release()
        raise
    if claim is not None:
        claim.done()
    return Submitted(job_id, job_type)
