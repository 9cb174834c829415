"""Jobs: create (POST /generate), read, download images, cancel."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse, JSONResponse
from redis import Redis
from starlette.concurrency import run_in_threadpool

from app import jobfiles, jobs
from app.api.deps import RedisDep, RegistryDep, SettingsDep
from app.errors import ImageNotFound, JobNotFinished
from app.openapi import errors
from app.params import resolve_erase, resolve_evaluate, resolve_generate
from app.queue import enqueue
from app.schemas import (
    EraseCreate,
    EvaluateCreate,
    GenerateCreate,
    JobCreated,
    JobLinks,
    JobPublic,
)

router = APIRouter(tags=["jobs"], responses=errors(401, 503))

_LOCATION = {"Location": {"schema": {"type": "string"}, "description": "The job's URL."}}
# What a route that queues a job answers.
CREATED = {202: {"headers": _LOCATION}, **errors(400, 404, 413, 422)}


def created(job, job_type: str) -> JSONResponse:
    body = JobCreated(id=job.id, type=job_type, status="queued",
                      links=JobLinks(self=f"/jobs/{job.id}"))
    return JSONResponse(body.model_dump(), 202, headers={"Location": f"/jobs/{job.id}"})


@router.post("/erase", status_code=202, response_model=JobCreated,
             responses={**CREATED, **errors(409)})
def create_erase(body: EraseCreate, redis: RedisDep, registry: RegistryDep,
                 settings: SettingsDep) -> JSONResponse:
    """Queue an ESD fine-tune; on success a new model appears in the registry (`result.model`)."""
    spec = resolve_erase(body, registry, settings)
    job = enqueue(redis, "erase", spec, timeout_s=settings.train_timeout_s,
                  result_ttl_s=settings.result_ttl_s, retries=settings.train_retries)
    return created(job, "erase")


@router.post("/evaluate", status_code=202, response_model=JobCreated, responses=CREATED)
def create_evaluate(body: EvaluateCreate, redis: RedisDep, registry: RegistryDep,
                    settings: SettingsDep) -> JSONResponse:
    """Queue an evaluation (FID, precision/recall, classifier or CLIP scores) of a model; the
    report lands in `result.report` and in the model's `reports` (`GET /models/{id}`)."""
    spec = resolve_evaluate(body, registry, settings)
    job = enqueue(redis, "evaluate", spec, timeout_s=settings.train_timeout_s,
                  result_ttl_s=settings.result_ttl_s)
    return created(job, "evaluate")


@router.post("/generate", status_code=202, response_model=JobCreated, responses=CREATED)
def create_generate(body: GenerateCreate, redis: RedisDep, registry: RegistryDep,
                    settings: SettingsDep) -> JSONResponse:
    """Queue a text-to-image job; poll `Location` for its progress and result."""
    spec = resolve_generate(body, registry, settings)
    job = enqueue(redis, "generate", spec, timeout_s=settings.generate_timeout_s,
                  result_ttl_s=settings.result_ttl_s)
    return created(job, "generate")


FINISHED = ("succeeded", "failed", "canceled")
POLL_FIRST_S, POLL_MAX_S = 0.02, 0.5  # a long poll's first and longest pause between reads


def _read(redis: Redis, job_id: str) -> dict:
    job = jobs.fetch(redis, job_id)
    jobs.reap_if_abandoned(redis, job)
    return jobs.describe(job)


@router.get("/jobs/{job_id}", response_model=JobPublic, responses=errors(404, 422))
async def get_job(job_id: str, redis: RedisDep,
                  wait: float = Query(0, ge=0, le=30, description="Seconds to hold the "
                                      "answer until the job has finished (long polling); "
                                      "0 answers at once.")) -> dict:
    """A job's status, progress and result. With `wait`, the answer comes when the job
    finishes or the time is up, whichever is first: one request instead of many polls."""
    deadline = time.monotonic() + wait
    pause = POLL_FIRST_S
    while True:
        # Each read borrows a worker thread for a moment; a waiting request holds none,
        # so many long polls cannot starve the other routes of threads.
        view = await run_in_threadpool(_read, redis, job_id)
        left = deadline - time.monotonic()
        if view["status"] in FINISHED or left <= 0:
            return view
        # Quick jobs answer quickly; a long wait reads Redis twice a second, not fifty
        # times (100 waiting clients took /healthz from 5 ms to 130 ms at 20 ms each).
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 1.5, POLL_MAX_S)


@router.get("/jobs/{job_id}/images/{index}", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}}, **errors(404, 409, 422)})
def get_image(job_id: str, index: int, redis: RedisDep, settings: SettingsDep) -> FileResponse:
    """A finished job's image `index` (0-based) as PNG."""
    view = jobs.describe(jobs.fetch(redis, job_id))
    if view["status"] != "succeeded":
        raise JobNotFinished(f"job {job_id!r} is {view['status']}; images exist once it succeeded")
    images = (view["result"] or {}).get("images", [])
    if not 0 <= index < len(images):
        raise ImageNotFound(
            f"`index` must be between 0 and {len(images) - 1} for job {job_id!r}, got {index}"
        )
    path = jobfiles.output_dir(settings, job_id) / images[index]["file"]
    if not path.is_file():
        raise ImageNotFound(f"image {index} of job {job_id!r} is no longer stored")
    return FileResponse(path, media_type="image/png")


@router.delete("/jobs/{job_id}", response_model=JobPublic, status_code=202,
               responses=errors(404))
def cancel_job(job_id: str, redis: RedisDep, settings: SettingsDep) -> Response:
    """Cancel: a queued job never runs; a running one stops at its next step (poll for it)."""
    job = jobs.fetch(redis, job_id)
    if jobs.state_of(job) in (jobs.JobState.queued, jobs.JobState.running):
        jobs.request_cancel(redis, job, settings.result_ttl_s)
        job.refresh()
        if jobs.state_of(job) == jobs.JobState.canceled:  # it never ran: its upload goes
            jobfiles.discard(settings, job_id)
    return JSONResponse(jobs.describe(job), 202)
