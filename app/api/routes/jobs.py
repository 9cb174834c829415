"""Jobs: create (POST /generate, /erase, /evaluate), list, read, follow, download images,
cancel. A caller sees its own jobs (an admin every job): another's reads as a 404."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse, JSONResponse
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from app import events, jobfiles, jobindex, jobs, webhooks
from app.accounts import Caller
from app.api.deps import (
    AsyncRedisDep,
    CallerDep,
    HoldsDep,
    RedisDep,
    RegistryDep,
    SettingsDep,
    SubmitterDep,
)
from app.config import Settings
from app.errors import InvalidParams, JobNotFinished, shown
from app.openapi import errors
from app.params import resolve_erase, resolve_evaluate, resolve_generate
from app.queue import JOB_TYPES
from app.schemas import (
    FINISHED,
    EraseCreate,
    EvaluateCreate,
    GenerateCreate,
    JobCreated,
    JobLinks,
    JobPublic,
    JobsPage,
)
from app.submissions import Submitted, submit

router = APIRouter(tags=["jobs"], responses=errors(401, 503))

_LOCATION = {"Location": {"schema": {"type": "string"}, "description": "The job's URL."},
             "Idempotent-Replayed": {"schema": {"type": "string"}, "description": "`true` "
                                     "when an earlier request with the same "
                                     "`Idempotency-Key` queued this job."}}
# What a route that queues a job answers: 409 for an Idempotency-Key reused with another
# body, 429 over a quota.
CREATED = {202: {"headers": _LOCATION}, **errors(400, 404, 409, 413, 422, 429)}


def created(job: Submitted) -> JSONResponse:
    body = JobCreated(id=job.id, type=job.type, status="queued",
                      links=JobLinks(self=f"/jobs/{job.id}"))
    headers = {"Location": f"/jobs/{job.id}"}
    if job.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body.model_dump(), 202, headers=headers)


@router.post("/erase", status_code=202, response_model=JobCreated, responses=CREATED)
def create_erase(body: EraseCreate, sub: SubmitterDep, registry: RegistryDep) -> JSONResponse:
    """Queue an ESD fine-tune; on success a new model appears in the registry (`result.model`)."""
    settings = sub.settings
    spec = resolve_erase(body, registry, settings)
    return created(submit(sub, "erase", spec, request=body.model_dump(mode="json"),
                          timeout_s=settings.train_timeout_s, retries=settings.train_retries,
                          webhook=webhooks.of_request(body, sub)))


@router.post("/evaluate", status_code=202, response_model=JobCreated, responses=CREATED)
def create_evaluate(body: EvaluateCreate, sub: SubmitterDep, registry: RegistryDep
                    ) -> JSONResponse:
    """Queue an evaluation (FID, precision/recall, classifier or CLIP scores) of a model; the
    report lands in `result.report` and, for the model's owner or an admin, in the model's
    `reports` (`GET /models/{id}`; the newest 20 are kept)."""
    settings = sub.settings
    spec = resolve_evaluate(body, registry, settings)
    spec = spec.model_copy(update={
        "record": sub.caller.may_see(registry.get(spec.model).get("owner"))})
    return created(submit(sub, "evaluate", spec, request=body.model_dump(mode="json"),
                          timeout_s=settings.train_timeout_s,
                          webhook=webhooks.of_request(body, sub)))


@router.post("/generate", status_code=202, response_model=JobCreated, responses=CREATED)
def create_generate(body: GenerateCreate, sub: SubmitterDep, registry: RegistryDep
                    ) -> JSONResponse:
    """Queue a text-to-image job; poll `Location` for its progress and result."""
    settings = sub.settings
    spec = resolve_generate(body, registry, settings)
    return created(submit(sub, "generate", spec, request=body.model_dump(mode="json"),
                          timeout_s=settings.generate_timeout_s, images=spec.num_images,
                          webhook=webhooks.of_request(body, sub)))


@router.get("/jobs", response_model=JobsPage, responses=errors(422))
def list_jobs(redis: RedisDep, caller: CallerDep,
              status: jobs.JobState | None = Query(None, description="Only jobs in this "
                                                   "state."),
              type: str | None = Query(None, description=f"Only jobs of this type: one of "
                                       f"{', '.join(JOB_TYPES)}."),
              limit: int = Query(20, ge=1, le=100),
              cursor: str | None = Query(None, description="`next_cursor` of the page "
                                         "before."),
              owner: str | None = Query(None, description="Admins: only this key name's "
                                        "jobs (default: everyone's).")) -> JobsPage:
    """The caller's jobs, newest first (an admin's: everyone's), a page at a time."""
    if type is not None and type not in JOB_TYPES:
        raise InvalidParams(f"`type` must be one of {list(JOB_TYPES)}, got {shown(type)}")
    if owner is not None and not caller.admin:
        raise InvalidParams("`owner` is for admin keys: a user lists its own jobs only")
    whose = (owner if caller.admin else caller.name)

    def keep(job) -> bool:
        return ((type is None or job.meta.get("type") == type)
                and (status is None or jobs.state_of(job) == status))

    found, next_cursor = jobindex.page(redis, whose, limit=limit, cursor=cursor, keep=keep)
    return JobsPage(data=[JobPublic(**jobs.describe(job)) for job in found],
                    next_cursor=next_cursor)


def _block_s(settings: Settings) -> float:
    """The longest a blocked read waits before the job's state is read once more: a third
    of the heartbeat TTL, so an end that sent no event (a killed worker, found out when its
    heartbeat lapses) reaches the readers about as soon as it can be known."""
    return min(15.0, max(1.0, settings.heartbeat_ttl_s / 3))


def _read(redis: Redis, job_id: str, caller: Caller) -> dict:
    job = jobs.fetch_for(redis, job_id, caller)
    jobs.reap_if_abandoned(redis, job)
    return jobs.describe(job)


ANSWER_S = 2.0  # what Redis may take beyond a read's own block before it counts as stalled


async def _bounded(command: Awaitable[Any], block_s: float = 0.0) -> Any:
    """A Redis command of the async client, or RedisTimeoutError (a 503) if a stalled Redis
    does not answer within ``block_s`` + ``ANSWER_S``: its socket timeout is longer, made
    for the blocking reads."""
    try:
        return await asyncio.wait_for(command, block_s + ANSWER_S)
    except asyncio.TimeoutError:
        raise RedisTimeoutError(f"no answer within {block_s + ANSWER_S:.0f} s") from None


async def _next_events(aredis: AsyncRedis, job_id: str, after: str, block_s: float
                       ) -> list[tuple[str, str, dict]]:
    """The job's events after ``after``, waiting in Redis up to ``block_s`` for one."""
    found = await _bounded(aredis.xread({events.key(job_id): after}, count=100,
                                        block=max(1, int(block_s * 1000))),  # 0: forever
                           block_s)
    return events.decode_read(found)


@router.get("/jobs/{job_id}", response_model=JobPublic, responses=errors(404, 422))
async def get_job(job_id: str, redis: RedisDep, aredis: AsyncRedisDep, settings: SettingsDep,
                  caller: CallerDep, holds: HoldsDep,
                  wait: float = Query(0, ge=0, le=30, description="Seconds to hold the "
                                      "answer until the job has finished (long polling); "
                                      "0 answers at once.")) -> dict:
    """A job's status, progress and result. With `wait`, the answer comes when the job
    finishes or the time is up, whichever is first: one request instead of many polls."""
    if not wait:
        return await run_in_threadpool(_read, redis, job_id, caller)
    with holds.hold(caller.name):
        return await until_finished(redis, aredis, job_id, caller, settings, wait)


async def until_finished(redis: Redis, aredis: AsyncRedis, job_id: str, caller: Caller,
                         settings: Settings, wait_s: float) -> dict:
    """The job's view once it has finished, or after ``wait_s``, whichever comes first.

    Waits on the stream of the job's final event only (progress does not wake it): its
    newest entry first, then the state, so an end after the read is an entry after."""
    ended = events.end_key(job_id)
    after = events.newest(await _bounded(aredis.xrevrange(ended, count=1)))
    view = await run_in_threadpool(_read, redis, job_id, caller)
    deadline = time.monotonic() + wait_s
    while view["status"] not in FINISHED:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        block_s = min(left, _block_s(settings))
        found = events.decode_read(await _bounded(aredis.xread(
            {ended: after}, count=1, block=max(1, int(block_s * 1000))), block_s))
        if found:
            after = found[-1][0]
        view = await run_in_threadpool(_read, redis, job_id, caller)
    return view


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse, responses={
    200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events: "
          "`progress`, `preview` (with `previews` on a generate), then one of `succeeded`, "
          "`failed`, `canceled` carrying the job."}, **errors(404, 422)})
async def job_events(job_id: str, redis: RedisDep, aredis: AsyncRedisDep,
                     settings: SettingsDep, caller: CallerDep, holds: HoldsDep,
                     last_event_id: str | None = Header(
                         None, description="Resume after this event: the id of the last "
                         "event received (browsers send it when they reconnect).")
                     ) -> EventSourceResponse:
    """The job's events as Server-Sent Events, from its first (or after `Last-Event-ID`)
    to its end; a job that has ended sends its history and its final event at once."""
    if last_event_id is not None and not events.valid_id(last_event_id):
        raise InvalidParams(f"`Last-Event-ID` {shown(last_event_id)} is not an event id "
                            "(<milliseconds>-<sequence>)")
    # a 404 before the stream starts
    view = await run_in_threadpool(_read, redis, job_id, caller)
    block_s = _block_s(settings)
    release = holds.take(caller.name)  # 429 / 503 before the stream starts
    return EventSourceResponse(
        _stream(redis, aredis, job_id, caller, last_event_id or "0-0", view, block_s,
                release),
        ping=15, background=BackgroundTask(release))  # if the stream never started


async def _stream(redis: Redis, aredis: AsyncRedis, job_id: str, caller: Caller, after: str,
                  view: dict, block_s: float, release: Callable[[], None]
                  ) -> AsyncIterator[dict]:
    try:
        async for event in _events(redis, aredis, job_id, caller, after, view, block_s):
            yield event
    finally:
        release()


async def _events(redis: Redis, aredis: AsyncRedis, job_id: str, caller: Caller, after: str,
                  view: dict, block_s: float) -> AsyncIterator[dict]:
    while True:
        ended = view["status"] in FINISHED
        try:
            found = await _next_events(aredis, job_id, after, 0.001 if ended else block_s)
        except RedisError:  # Redis away: the stream ends; a client resumes from `after`
            return
        for entry_id, name, data in found:
            after = entry_id
            yield {"event": name, "id": entry_id, "data": json.dumps(data)}
            if name in FINISHED:
                return
        if found:
            continue
        if ended:  # its events are gone (expired) or it ended without one: its state
            yield {"event": view["status"], "data": json.dumps(view)}
            return
        try:
            view = await run_in_threadpool(_read, redis, job_id, caller)
        except RedisError:
            return


@router.get("/jobs/{job_id}/images/{index}", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}}, **errors(404, 409, 422)})
def get_image(job_id: str, index: int, redis: RedisDep, settings: SettingsDep,
              caller: CallerDep) -> FileResponse:
    """A finished job's image `index` (0-based) as PNG."""
    view = jobs.describe(jobs.fetch_for(redis, job_id, caller))
    return FileResponse(image_file(view, settings, index), media_type="image/png")


def image_file(view: dict, settings: Settings, index: int) -> Path:
    """Where image ``index`` of the job ``view`` is stored (``jobfiles.stored_image``)."""
    return jobfiles.stored_image(settings, view, index)[0]


@router.delete("/jobs/{job_id}", response_model=JobPublic, status_code=202,
               responses=errors(404, 409))
def cancel_job(job_id: str, redis: RedisDep, settings: SettingsDep, caller: CallerDep,
               purge: bool = Query(False, description="A finished job: remove its images "
                                   "and record now rather than at the end of its TTL.")
               ) -> Response:
    """Cancel: a queued job never runs; a running one stops at its next step (poll for it).
    With `purge`, a finished job's files and record are removed at once (204)."""
    job = jobs.fetch_for(redis, job_id, caller)
    state = jobs.state_of(job)
    if purge:
        if state.value not in FINISHED:
            raise JobNotFinished(f"job {job_id!r} is {state.value}; cancel it first, then "
                                 "purge it once it has ended")
        jobfiles.discard(settings, job_id)
        jobs.purge(redis, job)
        return Response(status_code=204)
    if state in (jobs.JobState.queued, jobs.JobState.running):
        jobs.request_cancel(redis, job, settings.result_ttl_s)
        job.refresh()
        if jobs.state_of(job) == jobs.JobState.canceled:  # it never ran: its upload goes
            jobfiles.discard(settings, job_id)
    return JSONResponse(jobs.describe(job), 202)
