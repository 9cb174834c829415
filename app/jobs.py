"""Job state as clients see it, read from RQ's job hash and our ``job.meta``.

RQ's statuses are folded onto five: queued, running, succeeded, failed, canceled. A job
that a worker stopped because of a cancel flag raises inside the worker and is stored by
RQ as failed; ``meta["canceled"]`` tells it apart.
"""

from __future__ import annotations

import re
import time
from enum import Enum
from typing import Any

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import StartedJobRegistry

from app import events, webhooks
from app.accounts import Caller
from app.errors import JobNotFound, shown
from app.queue import cancel_key, text


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


_FROM_RQ = {
    RQStatus.QUEUED: JobState.queued,
    RQStatus.DEFERRED: JobState.queued,
    RQStatus.SCHEDULED: JobState.queued,
    RQStatus.STARTED: JobState.running,
    RQStatus.FINISHED: JobState.succeeded,
    RQStatus.FAILED: JobState.failed,
    RQStatus.STOPPED: JobState.canceled,
    RQStatus.CANCELED: JobState.canceled,
}


_JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def fetch(connection: Redis, job_id: str) -> Job:
    # fullmatch: with match and "$", "abc\n" would pass. Never a Redis key built from
    # arbitrary text.
    if not _JOB_ID_RE.fullmatch(job_id):
        raise JobNotFound(f"no job with id {shown(job_id)}")
    try:
        return Job.fetch(job_id, connection=connection)
    except (NoSuchJobError, ValueError):
        raise JobNotFound(f"no job with id {shown(job_id)}") from None


def fetch_for(connection: Redis, job_id: str, caller: Caller) -> Job:
    """Job ``job_id`` if ``caller`` may see it: its own, any job for an admin. Another's
    job is a 404, as if it did not exist: a 403 would tell that the id is someone's."""
    job = fetch(connection, job_id)
    if caller.may_see(job.meta.get("owner")):
        return job
    raise JobNotFound(f"no job with id {shown(job_id)}")


def reap_if_abandoned(connection: Redis, job: Job) -> None:
    """Fail a running job whose worker stopped heart-beating (killed, machine lost).

    RQ's workers only sweep these every few minutes; doing it when a client looks makes the
    time to `failed` the heartbeat TTL, not the sweep interval.
    """
    if job.get_status(refresh=False) == RQStatus.STARTED and job.origin:
        StartedJobRegistry(job.origin, connection=connection).cleanup()
        job.refresh()
        if job.get_status(refresh=False) == RQStatus.FAILED:  # it was abandoned: now it ends
            view = describe(job)
            events.publish(connection, job.id, "failed", view, job.result_ttl or 3600,
                           job.meta)


def state_of(job: Job) -> JobState:
    status = job.get_status(refresh=False)
    if job.meta.get("canceled") and status in (RQStatus.FAILED, RQStatus.CANCELED):
        return JobState.canceled
    return _FROM_RQ.get(status, JobState.queued) if status else JobState.queued


def _iso(value: Any) -> str | None:
    return value.isoformat() + ("Z" if value.tzinfo is None else "") if value else None


def describe(job: Job) -> dict[str, Any]:
    """The public view of a job (``JobPublic``)."""
    state = state_of(job)
    meta = job.meta
    error = None
    if state == JobState.failed:
        error = meta.get("error") or _error_from_exc(job)
    elif state == JobState.canceled:
        error = {"code": "canceled", "message": "the job was canceled"}
    result = job.return_value() if state == JobState.succeeded else None
    return {
        "id": job.id,
        "type": meta.get("type", "unknown"),
        "owner": meta.get("owner"),
        "status": state.value,
        "progress": meta.get("progress"),
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "ended_at": _iso(job.ended_at),
        "params": (job.kwargs or {}).get("params"),
        "result": result,
        "error": error,
        "links": {"self": f"/jobs/{job.id}"},
        "webhook": webhooks.record(job.connection, job.id) if meta.get("webhook") else None,
    }


def _error_from_exc(job: Job) -> dict[str, str]:
    latest = job.latest_result()
    text = (latest.exc_string if latest else "") or ""
    if "stuck in intermediate queue" in text:
        # RQ moved it from its queue to a worker's hands, then no worker ever started it
        # (the worker, or Redis, went away in between): RQ's sweep fails it a minute later.
        return {
            "code": "worker_lost",
            "message": "a worker took this job but stopped (or lost Redis) before it started",
        }
    if "AbandonedJobError" in text:
        return {
            "code": "worker_lost",
            "message": "the worker running this job stopped (killed or lost) before it finished",
        }
    if "JobTimeoutException" in text:
        return {"code": "timeout", "message": "the job ran past its time limit"}
    # Never a traceback to the client: the worker log has it.
    return {"code": "job_failed", "message": "the job failed; see the worker log"}


def purge(connection: Redis, job: Job) -> None:
    """Forget an ended job now: its record, result and events (its files are the caller's
    to remove, ``jobfiles.discard``); ``GET /jobs`` drops it from its pages."""
    job.delete()
    connection.delete(events.key(job.id), events.end_key(job.id))


# A job canceled before it ran keeps its record this long, not the result's week, and a
# key keeps the newest CANCELED_KEPT such records (older ones go at once): a key that
# submits and cancels in a loop (each cancel frees its quota place) must not fill Redis
# with records, at any rate of requests.
CANCELED_TTL_S = 3600
CANCELED_KEPT = 100
CANCELED = "lethe:canceled:"  # + owner: its jobs canceled before they ran, by time


def request_cancel(connection: Redis, job: Job, ttl_s: int) -> None:
    """Cancel a job: a queued one never runs, a running one stops at its next step."""
    connection.set(cancel_key(job.id), "1", ex=ttl_s)
    status = job.get_status(refresh=True)
    if status in (RQStatus.QUEUED, RQStatus.DEFERRED, RQStatus.SCHEDULED):
        ttl_s = min(ttl_s, CANCELED_TTL_S)
        job.meta["canceled"] = True
        job.save_meta()
        job.cancel()
        job.refresh()
        events.publish(connection, job.id, "canceled", describe(job), ttl_s, job.meta)
        connection.expire(job.key, ttl_s)
        connection.expire(cancel_key(job.id), ttl_s)
        _keep_newest_canceled(connection, str(job.meta.get("owner") or ""), job.id, ttl_s)


def _keep_newest_canceled(connection: Redis, owner: str, job_id: str, ttl_s: int) -> None:
    key = CANCELED + owner
    connection.zadd(key, {job_id: time.time()})
    connection.expire(key, ttl_s)
    excess = int(connection.zcard(key)) - CANCELED_KEPT
    # ZPOPMIN without a count pops one: ask only when there is something to drop.
    oldest: Any = connection.zpopmin(key, excess) if excess > 0 else []
    for old_id, _ in oldest:
        try:
            purge(connection, Job.fetch(text(old_id), connection=connection))
        except NoSuchJobError:
            pass
