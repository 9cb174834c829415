"""Jobs: create (POST /generate), read, download images, cancel."""

from __future__ import annotations

import re
import secrets

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, JSONResponse

from app import jobs
from app.api.deps import RedisDep, RegistryDep, SettingsDep
from app.errors import ImageNotFound, InvalidParams, JobNotFinished, JobNotFound, ModelExists
from app.queue import enqueue
from app.registry import Registry, validate_model_id
from app.schemas import EraseCreate, GenerateCreate, JobCreated, JobLinks, JobPublic

router = APIRouter(tags=["jobs"])

_JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _created(job, job_type: str) -> JSONResponse:
    body = JobCreated(id=job.id, type=job_type, status="queued",
                      links=JobLinks(self=f"/jobs/{job.id}"))
    return JSONResponse(body.model_dump(), 202, headers={"Location": f"/jobs/{job.id}"})


def resolve_generate(body: GenerateCreate, registry: Registry, default_model: str,
                     max_side: int) -> dict:
    """Fill defaults from the model's manifest and check the request against its limits."""
    model_id = body.model or default_model
    manifest = registry.get(model_id)
    if manifest["kind"] != "text-to-image":
        raise InvalidParams(
            f"`model` {model_id!r} is a {manifest['kind']} model, not text-to-image"
        )
    defaults = manifest.get("defaults") or {}
    params = body.model_dump()
    params["model"] = model_id
    for key in ("steps", "guidance_scale", "width", "height", "scheduler"):
        if params[key] is None:
            params[key] = defaults.get(key)
    params["steps"] = params["steps"] or 30
    params["guidance_scale"] = 7.5 if params["guidance_scale"] is None else params["guidance_scale"]
    params["scheduler"] = params["scheduler"] or "ddim"
    if params["seed"] is None:  # drawn here so the job's params say how to reproduce it
        params["seed"] = secrets.randbelow(2**31)
    limit = min(int((manifest.get("limits") or {}).get("max_side", max_side)), max_side)
    for side in ("width", "height"):
        params[side] = params[side] or defaults.get("size") or 512
        if params[side] > limit:
            raise InvalidParams(
                f"`{side}` must be at most {limit} for model {model_id!r}, got {params[side]}"
            )
    return params


def resolve_erase(body: EraseCreate, registry: Registry, default_model: str) -> dict:
    base_id = body.base_model or default_model
    manifest = registry.get(base_id)
    if manifest["kind"] != "text-to-image" or manifest["format"] != "diffusers":
        raise InvalidParams(
            f"`base_model` must be a base text-to-image model, got {base_id!r} "
            f"({manifest['kind']}, {manifest['format']})"
        )
    defaults = manifest.get("erase_defaults") or {}
    evaluator = manifest.get("evaluator")
    if body.evaluate and not evaluator:
        raise InvalidParams(
            f"`evaluate` is true but model {base_id!r} names no evaluator (a classifier of its "
            "domain) in its manifest"
        )
    params = body.model_dump()
    params["evaluate"] = bool(evaluator) if body.evaluate is None else body.evaluate
    params["evaluator"] = evaluator
    params["base_model"] = base_id
    params["iterations"] = params["iterations"] or defaults.get("iterations", 1000)
    params["learning_rate"] = params["learning_rate"] or defaults.get("learning_rate", 1e-5)
    params["ddim_steps"] = defaults.get("ddim_steps", 50)
    params["start_guidance"] = defaults.get("start_guidance", 3.0)
    gen = manifest.get("defaults") or {}
    params["height"], params["width"] = gen.get("height", 512), gen.get("width", 512)
    if body.name:
        validate_model_id(body.name, "name")
        if registry.exists(body.name):
            raise ModelExists(f"`name` {body.name!r} is taken: a model with that id exists")
        params["name"] = body.name
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", "-".join(body.concepts).lower()).strip("-")[:30]
        stem = f"{base_id[:24]}-no-{slug or 'concept'}"
        name, n = stem, 2
        while registry.exists(name):
            name, n = f"{stem}-{n}", n + 1
        params["name"] = name
    return params


@router.post("/erase", status_code=202, response_model=JobCreated)
def create_erase(body: EraseCreate, redis: RedisDep, registry: RegistryDep,
                 settings: SettingsDep) -> JSONResponse:
    """Queue an ESD fine-tune; on success a new model appears in the registry (`result.model`)."""
    params = resolve_erase(body, registry, settings.default_model)
    job = enqueue(redis, "erase", params, timeout_s=settings.train_timeout_s,
                  result_ttl_s=settings.result_ttl_s, retries=settings.train_retries)
    return _created(job, "erase")


@router.post("/generate", status_code=202, response_model=JobCreated,
             responses={202: {"headers": {"Location": {"schema": {"type": "string"}}}}})
def create_generate(body: GenerateCreate, redis: RedisDep, registry: RegistryDep,
                    settings: SettingsDep) -> JSONResponse:
    """Queue a text-to-image job; poll `Location` for its progress and result."""
    params = resolve_generate(body, registry, settings.default_model, settings.max_side)
    job = enqueue(redis, "generate", params, timeout_s=settings.generate_timeout_s,
                  result_ttl_s=settings.result_ttl_s)
    return _created(job, "generate")


def _fetch(redis, job_id: str):
    if not _JOB_ID_RE.match(job_id):
        raise JobNotFound(f"no job with id {job_id!r}")
    return jobs.fetch(redis, job_id)


@router.get("/jobs/{job_id}", response_model=JobPublic)
def get_job(job_id: str, redis: RedisDep) -> dict:
    job = _fetch(redis, job_id)
    jobs.reap_if_abandoned(redis, job)
    return jobs.describe(job)


@router.get("/jobs/{job_id}/images/{index}", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}}})
def get_image(job_id: str, index: int, redis: RedisDep, settings: SettingsDep) -> FileResponse:
    """A finished job's image `index` (0-based) as PNG."""
    view = jobs.describe(_fetch(redis, job_id))
    if view["status"] != "succeeded":
        raise JobNotFinished(f"job {job_id!r} is {view['status']}; images exist once it succeeded")
    images = (view["result"] or {}).get("images", [])
    if not 0 <= index < len(images):
        raise ImageNotFound(
            f"`index` must be between 0 and {len(images) - 1} for job {job_id!r}, got {index}"
        )
    path = settings.outputs_dir / job_id / images[index]["file"]
    if not path.is_file():
        raise ImageNotFound(f"image {index} of job {job_id!r} is no longer stored")
    return FileResponse(path, media_type="image/png")


@router.delete("/jobs/{job_id}", response_model=JobPublic, status_code=202)
def cancel_job(job_id: str, redis: RedisDep, settings: SettingsDep) -> Response:
    """Cancel: a queued job never runs; a running one stops at its next step (poll for it)."""
    job = _fetch(redis, job_id)
    if jobs.state_of(job) in (jobs.JobState.queued, jobs.JobState.running):
        jobs.request_cancel(redis, job, settings.result_ttl_s)
        job.refresh()
    return JSONResponse(jobs.describe(job), 202)
