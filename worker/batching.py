"""Micro-batching: a worker that starts a generate job takes compatible queued ones along.

A denoising step for eight images costs far less than eight steps for one, so a worker
that finds other generate jobs waiting with the same model, size, steps, scheduler,
guidance and negative prompt runs them in one pipeline call (each image keeps its own
seeded generator, so each job still gets its own images).

The companions stay in RQ's queue, where RQ keeps their status and order; the leader only
*claims* them (``SET NX`` with a lifetime) and, when the batch is done, leaves each one's
result under a key. When a worker then runs a companion, it finds the result and returns
it at once. If the leader fails or is canceled it releases its claims, and if it dies the
claims expire: either way a companion then runs on its own. Nothing is lost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from redis import Redis
from rq.job import Job

from app.jobspecs import GenerateJob

# The params that must match for two jobs to share a pipeline call.
BATCH_KEYS = ("model", "width", "height", "steps", "scheduler", "guidance_scale",
              "negative_prompt")
LOOK_AHEAD = 64  # queued jobs inspected for companions


def claim_key(job_id: str) -> str:
    return f"lethe:batch:claim:{job_id}"


def result_key(job_id: str) -> str:
    return f"lethe:batch:result:{job_id}"


def batch_key(params: dict[str, Any]) -> tuple | None:
    # On the queued form (``JobSpec.queued``): what the other jobs in the queue hold.
    """What must match; None for a job that never batches (a cascade upscales per job; a
    job with previews sends its own pictures)."""
    if params.get("upscale") or params.get("previews"):
        return None
    return tuple(params.get(k) for k in BATCH_KEYS)


def claim_companions(job: Job, params: dict, max_images: int, claim_ttl_s: int
                     ) -> list[Job]:
    """Claim queued generate jobs that can share ``job``'s pipeline call, in queue order,
    up to ``max_images`` images in all."""
    key = batch_key(params)
    room = max_images - params["num_images"]
    if key is None or room <= 0:
        return []
    from rq import Queue

    from app.queue import cancel_key

    redis: Redis = job.connection
    queue = Queue(job.origin, connection=redis)
    companions = []
    for other_id in queue.get_job_ids(0, LOOK_AHEAD):
        if other_id == job.id:
            continue
        try:
            other = Job.fetch(other_id, connection=redis)
        except Exception:  # expired or deleted since it was listed
            continue
        if other.func_name != job.func_name or redis.exists(cancel_key(other_id)):
            continue
        p = other.kwargs.get("params") or {}
        if batch_key(p) != key or p.get("num_images", 1) > room:
            continue
        if redis.set(claim_key(other_id), job.id, nx=True, ex=claim_ttl_s):
            companions.append(other)
            room -= p["num_images"]
            if room <= 0:
                break
    return companions


def release(redis: Redis, companions: list[Job]) -> None:
    """Give claimed jobs back: they run on their own."""
    if companions:
        redis.delete(*(claim_key(c.id) for c in companions))


def deliver(redis: Redis, job_id: str, result: dict, ttl_s: int) -> None:
    redis.set(result_key(job_id), json.dumps(result), ex=ttl_s)


def collect(redis: Redis, job_id: str, check: Callable[[], None] = lambda: None,
            poll_s: float = 0.05) -> dict | None:
    """The result a leader computed for ``job_id``: waits while a leader holds its claim
    (``check`` may raise to stop waiting: a cancel); None when no leader has it (run the
    job yourself)."""
    while True:
        check()
        raw = redis.get(result_key(job_id))
        if raw is not None:
            redis.delete(result_key(job_id), claim_key(job_id))
            return json.loads(raw)
        if not redis.exists(claim_key(job_id)):
            return None
        time.sleep(poll_s)


def merged_inputs(members: list[tuple[str, GenerateJob]]) -> dict[str, Any]:
    """The prompts, negative prompts and seeds of a batch, image by image."""
    prompts: list[str] = []
    negatives: list[str | None] = []
    seeds: list[int] = []
    for _, p in members:
        n = p.num_images
        prompts += [p.prompt] * n
        negatives += [p.negative_prompt] * n
        seeds += [p.seed + i for i in range(n)]
    return {"prompts": prompts, "negatives": negatives, "seeds": seeds}
