"""Redis connection and the RQ queues, shared by the API and the workers.

Jobs are enqueued by dotted path ("worker.jobs.generate") so the API never imports torch.
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from rq import Queue, Retry

IMAGES, TRAIN = "images", "train"

# Which queue and job function each job type uses (each route passes its own timeout).
JOB_TYPES: dict[str, dict[str, str]] = {
    "generate": {"queue": IMAGES, "func": "worker.jobs.generate"},
    "upscale": {"queue": IMAGES, "func": "worker.jobs.upscale"},
    "erase": {"queue": TRAIN, "func": "worker.jobs.erase"},
    "evaluate": {"queue": TRAIN, "func": "worker.jobs.evaluate"},
}


def connect(url: str, timeout_s: float = 2.0, blocking: bool = False) -> Redis:
    """A Redis client that fails in ``timeout_s`` instead of hanging when Redis is gone.

    ``blocking`` clients (workers) wait on BLPOP for longer than any socket timeout we
    would pick, so they get none on reads.
    """
    return Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=None if blocking else timeout_s,
        health_check_interval=30,
    )


def cancel_key(job_id: str) -> str:
    """The flag a worker reads at every step; set by DELETE /jobs/{id}."""
    return f"lethe:cancel:{job_id}"


def enqueue(
    connection: Redis,
    job_type: str,
    params: dict[str, Any],
    *,
    timeout_s: int,
    result_ttl_s: int,
    retries: int = 0,
    job_id: str | None = None,
) -> Any:
    spec = JOB_TYPES[job_type]
    queue = Queue(spec["queue"], connection=connection)
    return queue.enqueue(
        spec["func"],
        job_id=job_id,
        kwargs={"params": params},
        job_timeout=timeout_s,
        result_ttl=result_ttl_s,
        failure_ttl=result_ttl_s,
        ttl=result_ttl_s,
        retry=Retry(max=retries) if retries else None,
        meta={"type": job_type, "progress": {"step": 0, "total": 0, "fraction": 0.0,
                                             "stage": "queued"}},
    )
