"""The RQ worker Lethe runs: jobs in-process, heart-beating from a side thread.

RQ's default worker forks a child per job. CUDA cannot live across a fork and the pipeline
cache would be lost with each child, so Lethe runs jobs in the worker process itself
(``SimpleWorker``). Such a worker cannot heart-beat while a job holds its main thread, so a
small thread does it: a worker killed with ``kill -9`` stops beating, and its job is marked
failed (``worker_lost``) about ``heartbeat_ttl_s`` later instead of staying "running".
"""

from __future__ import annotations

import logging
import os
import threading

from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue
from rq.worker import WorkerStatus

from app.config import Settings
from app.queue import connect
from worker.context import get_context
from worker.defaults import ensure_default_models

log = logging.getLogger("lethe.worker")


class LetheWorker(SimpleWorker):
    heartbeat_ttl_s = 30

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.heartbeat_ttl_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), daemon=True,
                                name=f"heartbeat-{job.id}")
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join(timeout=5)
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_ttl_s / 3):
            try:
                self.maintain_heartbeats(job, execution)
            except Exception:  # a missed beat is retried; it must not kill the job
                log.warning("heartbeat for job %s failed", job.id, exc_info=True)


def _set_threads(settings: Settings, device: str) -> None:
    """A CPU worker shares its cores with the API, Redis and the other workers. With one
    torch thread per core, every poll the API answers preempts a thread of each parallel
    region and the whole step waits for it: on 2 cores a 20-step shapes-sd call took 332 ms
    in the worker against 274 ms alone; with one core left free, 302 ms."""
    import torch

    threads = settings.torch_threads or (max(1, (os.cpu_count() or 2) - 1)
                                         if device == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)


def run_worker(settings: Settings, queues: list[str], burst: bool = False,
               name: str | None = None) -> None:
    if not settings.redis_url:
        raise SystemExit("LETHE_REDIS_URL is not set; `lethe serve` sets it for its workers")
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx = get_context()
    _set_threads(settings, ctx.runtime.device.type)
    ensure_default_models(ctx.registry)
    connection = connect(settings.redis_url, blocking=True)
    LetheWorker.heartbeat_ttl_s = settings.heartbeat_ttl_s
    worker = LetheWorker(
        [Queue(q, connection=connection) for q in queues],
        connection=connection,
        name=name,
        worker_ttl=max(settings.heartbeat_ttl_s, 20),
        job_monitoring_interval=max(settings.heartbeat_ttl_s // 3, 1),
        maintenance_interval=max(settings.heartbeat_ttl_s, 10),
    )
    import torch

    log.info("worker %s on %s, device %s, dtype %s, %d CPU threads", worker.name, queues,
             ctx.runtime.device, ctx.runtime.dtype, torch.get_num_threads())
    worker.work(burst=burst, logging_level="INFO")
