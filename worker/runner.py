"""The RQ worker Lethe runs: jobs in-process, a pulse from a side thread, Redis outages
survived.

RQ's default worker forks a child per job. CUDA cannot live across a fork and the pipeline
cache would be lost with each child, so Lethe runs jobs in the worker process itself
(``SimpleWorker``). Such a worker cannot heart-beat while a job holds its main thread, so a
small thread does it, busy or idle: it beats the worker's liveness key (``app.workers``,
what ``/readyz`` counts) and the running job's heartbeat. A worker killed with ``kill -9``
stops beating, and its job is marked failed (``worker_lost``) about ``heartbeat_ttl_s``
later instead of staying "running"; a worker that was paused is counted again at its first
beat after it resumes.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import SimpleWorker
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.worker import WorkerStatus

from app import events, jobfiles, jobs, logs, workers
from app.config import Settings
from app.queue import connect
from app.schemas import FINISHED
from worker.context import get_context
from worker.defaults import ensure_default_models
from worker.domains import register_from_setting
from worker.progress import held_here

log = logging.getLogger("lethe.worker")

REDIS_LOST = {"code": "redis_lost",
              "message": "the job store (Redis) went away while this job ran; submit it again"}


class _TakenJob(logging.Filter):
    """RQ names the job it has just taken (``Worker <name>: <queue>: <job> (<id>)``) before
    it runs it, outside the job's context: that line gets the job's id too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (isinstance(record.msg, str) and record.msg.startswith("Worker %s: %s: ")
                and isinstance(record.args, tuple) and record.args):
            record.job_id = record.args[-1]
        return True


class LetheWorker(SimpleWorker):
    heartbeat_ttl_s = 30

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.heartbeat_ttl_s

    def bootstrap(self, *args, **kwargs) -> None:
        super().bootstrap(*args, **kwargs)
        self._running: tuple[Job, Execution] | None = None
        self._pulse_stop = threading.Event()
        self._pulse = threading.Thread(target=self._pulse_loop, daemon=True, name="pulse")
        self._pulse.start()

    def teardown(self) -> None:
        pulse = getattr(self, "_pulse", None)
        if pulse is not None:
            self._pulse_stop.set()
            pulse.join(timeout=5)
            try:
                workers.leave(self.connection, self.name)
            except RedisError:
                pass  # its key expires by itself
        super().teardown()

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        self._running = (job, execution)
        token = logs.current_job.set(job.id)  # every line logged for this job names it
        try:
            self.perform_job(job, queue, execution)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # RQ could not even record the outcome. Rather than quit (its default), wait
            # for Redis and then fail the job the ordinary way, so that a job with retries
            # left (an erase) is queued again and resumes from its checkpoint.
            self._running = None
            log.error("lost Redis while running job %s (%s); waiting for it to come back",
                      job.id, type(exc).__name__)
            if self._wait_for_redis():
                self._fail_after_outage(job, queue, execution)
        finally:
            self._running = None
            logs.current_job.reset(token)
        self.set_state(WorkerStatus.IDLE)

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry, execution
                           ) -> None:
        if self._superseded(job):
            return
        super().handle_job_success(job, queue, started_job_registry, execution)
        _announce_end(job)

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry=None,
                           exc_string: str = "", execution: Execution | None = None) -> None:
        if self._superseded(job):
            return
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)
        _announce_end(job)

    def _superseded(self, job: Job) -> bool:
        """A run whose job was given to another worker meanwhile (this one was cut off from
        Redis past the heartbeat TTL) records no outcome: the job is the other run's."""
        try:
            if held_here(job):
                return False
        except RedisError:
            return False  # RQ's own handling meets the same outage and deals with it
        log.warning("job %s is another worker's now; this run's outcome is dropped", job.id)
        return True

    def _wait_for_redis(self) -> bool:
        delay = 0.5
        while not self._stop_requested:
            try:
                self.connection.ping()
                return True
            except RedisError:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        return False

    def _fail_after_outage(self, job: Job, queue: Queue, execution: Execution) -> None:
        try:
            job.refresh()
        except NoSuchJobError:
            log.error("job %s did not survive the Redis outage", job.id)
            return
        if self._superseded(job):
            return
        job.meta["error"] = REDIS_LOST
        job.save_meta()
        self.handle_job_failure(job, queue, queue.started_job_registry,
                                exc_string="the job store (Redis) went away while the job ran",
                                execution=execution)
        log.info("job %s ended after the Redis outage (retries left: %s)", job.id,
                 job.retries_left)

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        try:
            settings = get_context().settings
            # A file younger than a short TTL's record may be swept as soon as that expires.
            removed = jobfiles.sweep(self.connection, settings,
                                     min_age_s=min(jobfiles.MIN_AGE_S, settings.result_ttl_s))
        except (OSError, RedisError):
            log.warning("sweeping job files failed", exc_info=True)
            return
        if removed:
            log.info("removed the files of %d ended or expired jobs", len(removed))

    def _pulse_loop(self) -> None:
        self._beat()  # at once: a worker is ready as soon as it listens
        while not self._pulse_stop.wait(self.heartbeat_ttl_s / 3):
            self._beat()

    def _beat(self) -> None:
        try:
            workers.beat(self.connection, self.name, self.queue_names(), self.heartbeat_ttl_s,
                         cache=_cache_info())
            running = self._running
            if running is not None:
                self.maintain_heartbeats(*running)
        except Exception:  # a missed beat is retried; it must not kill the worker
            log.warning("worker %s: heartbeat failed", self.name, exc_info=True)


def _cache_info() -> dict[str, int]:
    """The pipeline cache's numbers, for /metrics (through the worker's beat)."""
    cache = get_context().cache
    return {"hits": cache.stats.hits, "loads": cache.stats.loads,
            "evictions": cache.stats.evictions, "bytes": cache.bytes, "models": len(cache)}


def _announce_end(job: Job) -> None:
    """The job's final event, once RQ has stored the outcome (a job RQ queues again for a
    retry has not ended: nothing is sent)."""
    try:
        job.refresh()
        view = jobs.describe(job)
        if view["status"] in FINISHED:
            events.publish(job.connection, job.id, view["status"], view,
                           get_context().settings.result_ttl_s, job.meta)
    except (RedisError, NoSuchJobError):
        log.warning("job %s: its final event could not be sent", job.id, exc_info=True)


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
    logs.configure(settings.log_format)
    logging.getLogger("rq.worker").addFilter(_TakenJob())
    register_from_setting(settings.domains)
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
        # RQ's own upkeep (abandoned jobs) as before; the reaper at least as often as asked
        maintenance_interval=min(settings.reap_interval_s, max(settings.heartbeat_ttl_s, 10)),
    )
    import torch

    log.info("worker %s on %s, device %s, dtype %s, %d CPU threads", worker.name, queues,
             ctx.runtime.device, ctx.runtime.dtype, torch.get_num_threads())
    worker.work(burst=burst, logging_level="INFO")
