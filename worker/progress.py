"""Progress reporting and cooperative cancellation for a running job.

RQ's stop command cannot reach a job that runs inside the worker process, so a job stops
itself: the step callback reads the cancel flag (one Redis GET) at every step and raises.
Progress goes to ``job.meta`` and, as an event, to the job's stream (``app.events``), at
most every ``interval_s`` so a fast loop does not turn into a stream of Redis writes.
"""

from __future__ import annotations

import time
from typing import Any

from redis import Redis
from rq.job import Job

from app import events
from app.queue import cancel_key


class JobCanceled(Exception):
    """Raised inside a job at the step after its cancel flag was set."""


class JobSuperseded(Exception):
    """Raised inside a job that is no longer this worker's: its worker lost Redis long
    enough for the job to be run again elsewhere (a host cut off the network). This run
    then writes nothing more — no progress, no files, no outcome — for the other run owns
    the job's record and files now."""


def held_here(job: Job) -> bool:
    """Whether ``job`` is still started, and by the worker that started this run."""
    return _held(job, job.connection.hmget(job.key, "status", "worker_name"))


def _held(job: Job, fields: list) -> bool:
    status, worker = (f.decode() if isinstance(f, bytes) else f for f in fields)
    return status == "started" and worker == job.worker_name


class Reporter:
    def __init__(self, job: Job | None, connection: Redis | None, interval_s: float = 0.25,
                 ttl_s: int = 7 * 24 * 3600):
        self.job, self.connection, self.interval_s = job, connection, interval_s
        self.ttl_s = ttl_s  # how long the job's events are kept: as long as its record
        self._last_write = 0.0

    def check(self) -> None:
        """At each step: stop if the job was canceled, or run again elsewhere (one round
        trip for both)."""
        if self.job is None or self.connection is None:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.exists(cancel_key(self.job.id))
            pipe.hmget(self.job.key, "status", "worker_name")
            canceled, fields = pipe.execute()
        if canceled:
            raise JobCanceled(self.job.id)
        if self.job.worker_name and not _held(self.job, fields):
            raise JobSuperseded(self.job.id)

    def progress(self, step: int, total: int, stage: str, force: bool = False, **extra: Any
                 ) -> None:
        if self.job is None:
            return
        now = time.monotonic()
        if not force and step < total and now - self._last_write < self.interval_s:
            return
        self._last_write = now
        fraction = round(step / total, 4) if total else 0.0
        progress = {"step": step, "total": total, "fraction": fraction, "stage": stage,
                    **extra}
        self.job.meta["progress"] = progress
        self.job.save_meta()
        self.event("progress", progress)

    def event(self, name: str, data: dict[str, Any]) -> None:
        """Append an event to the job's stream (a preview, progress)."""
        if self.job is not None and self.connection is not None:
            events.publish(self.connection, self.job.id, name, data, self.ttl_s,
                           self.job.meta)

    def step_callback(self, total: int, stage: str):
        """A diffusers ``callback_on_step_end`` that reports and honours cancel."""

        def callback(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            self.check()
            self.progress(step + 1, total, stage)
            return kwargs

        return callback

    def span(self, offset: int, total: int, stage: str):
        """An ``on_step(done, _)`` for one part of a longer job: steps ``offset + done``
        of ``total`` (the legacy-callback pipelines, the upscaler, report through it)."""

        def on_step(done: int, _part_total: int) -> None:
            self.check()
            self.progress(offset + done, total, stage)

        return on_step

    def set_meta(self, **fields: Any) -> None:
        if self.job is not None:
            self.job.meta.update(fields)
            self.job.save_meta()
