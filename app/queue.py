"""Redis connection and the RQ queues, shared by the API and the workers.

Jobs are enqueued by dotted path ("worker.jobs.generate") so the API never imports torch.
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from redis.asyncio import BlockingConnectionPool as AsyncBlockingPool
from redis.asyncio import Redis as AsyncRedis
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry
from rq import Queue, Retry
from rq.job import Job

from app import jobindex, metrics
from app.errors import Unavailable
from app.jobspecs import JobSpec

IMAGES, TRAIN = "images", "train"

# Which queue and job function each job type uses (each route passes its own timeout).
JOB_TYPES: dict[str, dict[str, str]] = {
    "generate": {"queue": IMAGES, "func": "worker.jobs.generate"},
    "upscale": {"queue": IMAGES, "func": "worker.jobs.upscale"},
    "erase": {"queue": TRAIN, "func": "worker.jobs.erase"},
    "evaluate": {"queue": TRAIN, "func": "worker.jobs.evaluate"},
    "import": {"queue": TRAIN, "func": "worker.jobs.import_model"},
    "export": {"queue": TRAIN, "func": "worker.jobs.export_model"},
}

# How long Redis may take to apply a submission after the API started it (see ``enqueue``).
# Shorter than the API's socket timeout, so a submission the API gave up on is always late.
SUBMIT_WINDOW_MS = 1500


def text(value: Any) -> str:
    """A Redis reply's bytes as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def connect_async(url: str, timeout_s: float = 2.0, longest_block_s: float = 30.0,
                  max_connections: int | None = None) -> AsyncRedis:
    """The API's client for reads that block in Redis (``XREAD BLOCK``): a socket timeout
    past the longest block, so a stalled Redis still ends the read. With
    ``max_connections`` its pool is bounded: a command past it waits up to ``timeout_s``
    for a connection to come back, then fails (a 503)."""
    if max_connections is None:
        return AsyncRedis.from_url(url, socket_connect_timeout=timeout_s,
                                   socket_timeout=longest_block_s + timeout_s)
    pool = AsyncBlockingPool.from_url(url, max_connections=max_connections, timeout=timeout_s,
                                      socket_connect_timeout=timeout_s,
                                      socket_timeout=longest_block_s + timeout_s)
    return AsyncRedis.from_pool(pool)  # closing the client closes its pool


def connect(url: str, timeout_s: float = 2.0, blocking: bool = False) -> Redis:
    """A Redis client that fails in ``timeout_s`` instead of hanging when Redis is gone.

    The API's client (the default) tries each command once: redis-py would otherwise retry
    a timed-out command three times with back-off, turning a stalled Redis into a request
    that hangs for many seconds and a write that may land twice. ``blocking`` clients
    (workers) wait on BLPOP for longer than any socket timeout we would pick, so they get
    none on reads and keep redis-py's retries, which ride out a Redis restart.
    """
    if blocking:
        return Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=None,
                              health_check_interval=30)
    return Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        health_check_interval=30,
        retry=RedisRetry(NoBackoff(), 0),
    )


def cancel_key(job_id: str) -> str:
    """The flag a worker reads at every step; set by DELETE /jobs/{id}."""
    return f"lethe:cancel:{job_id}"


def _submit_key(job_id: str) -> str:
    return f"lethe:submit:{job_id}"


# Runs last inside the enqueue transaction. If the submission's window has passed (its key
# expired), the API has already answered 503 and the client will try again: take the job
# back out, so a submission Redis applies after a stall never runs behind the client's back.
_SUBMIT_GUARD = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('DEL', KEYS[3])
return 0
"""


def enqueue(
    connection: Redis,
    job_type: str,
    spec: JobSpec,
    *,
    timeout_s: int,
    result_ttl_s: int,
    retries: int = 0,
    job_id: str | None = None,
    webhook: dict[str, Any] | None = None,
    owner: str | None = None,
) -> Job:
    """Queue a job (its spec, as JSON), or raise ``Unavailable`` with nothing queued.
    ``owner``: the caller it belongs to (indexed for ``GET /jobs``). A cancel flag left
    by an earlier job of the same id (an export asked for again) goes: a cancel never
    outlives its job.

    Redis applies commands that reach it while it is stalled once it resumes, so a client
    that got a 503 could still find its job running later (and run it twice by retrying).
    The job's commands therefore carry a deadline in Redis' own clock: a key set just
    before, with a lifetime of ``SUBMIT_WINDOW_MS``, which a script at the end of the same
    transaction checks; past it, the transaction removes the job it has just added.
    """
    kind = JOB_TYPES[job_type]
    queue = Queue(kind["queue"], connection=connection)
    queue.get_redis_server_version()  # RQ asks for it mid-enqueue otherwise: ask it first
    job = queue.create_job(
        kind["func"],
        job_id=job_id,
        kwargs={"params": spec.queued()},
        timeout=timeout_s,
        result_ttl=result_ttl_s,
        failure_ttl=result_ttl_s,
        ttl=None,  # a queued job waits for a worker however long: it is never dropped
        retry=Retry(max=retries) if retries else None,
        meta={"type": job_type, "progress": {"step": 0, "total": 0, "fraction": 0.0,
                                             "stage": "queued"},
              **({"webhook": webhook} if webhook else {}),
              **({"owner": owner} if owner else {})},
    )
    number = jobindex.next_number(connection) if owner else 0
    guard = _submit_key(job.id)
    connection.set(guard, 1, px=SUBMIT_WINDOW_MS)
    with connection.pipeline(transaction=True) as pipe:
        queue.enqueue_job(job, pipeline=pipe)  # first: it opens the transaction
        pipe.delete(cancel_key(job.id))
        if owner:
            jobindex.add(pipe, owner, job.id, number)
        metrics.inc(pipe, "lethe_jobs_submitted", type=job_type)
        pipe.eval(_SUBMIT_GUARD, 3, guard, queue.key, job.key, job.id)
        applied = pipe.execute()[-1]
    if not applied:
        raise Unavailable("the job store (Redis) was too slow to accept the job; it was not "
                          "queued, retry later")
    return job
