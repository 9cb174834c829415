"""OpenAI-compatible routes: the Images API (`POST /v1/images/generations`) and the model
list (`GET /v1/models`), so the clients people already run — the official `openai` SDKs,
chat front ends, agent frameworks — draw with Lethe's models.

A generation is an ordinary generate job (owned, counted against the key's quotas,
`Idempotency-Key` honoured) that the request waits for, up to `LETHE_OPENAI_WAIT_S`. Errors
here come in OpenAI's shape (``app.api.handlers.shaped``). Images come back as base64 or as
signed links (``app.links``) that work without the key, as OpenAI's own URLs do.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app import jobs, links
from app.api.deps import (
    AsyncRedisDep,
    HoldsDep,
    RedisDep,
    RegistryDep,
    SettingsDep,
    SubmitterDep,
)
from app.api.routes.jobs import image_file, until_finished
from app.config import Settings
from app.errors import InvalidParams, JobEndedBadly, JobUnfinished, ModelNotFound, shown
from app.openapi import errors, openai_errors
from app.params import resolve_generate
from app.registry import Registry
from app.schemas import (
    MODEL_ID_PATTERN,
    GenerateCreate,
    ImageData,
    ImageGeneration,
    ImagesResponse,
    OpenAIModel,
    OpenAIModels,
)
from app.submissions import submit

log = logging.getLogger("lethe.api")
router = APIRouter(prefix="/v1", tags=["openai"], responses=openai_errors(400, 401, 429, 503))
# Signed links: no key (the signature is the permission), so outside the bearer scheme.
files = APIRouter(tags=["openai"])

_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
# Lethe's field names where OpenAI's differ, for messages that name what the client sent.
_OPENAI_NAMES = {"num_images": "n", "width": "size", "height": "size"}


def _size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    found = _SIZE.fullmatch(size)
    if not found:
        raise InvalidParams(f"`size` must be '<width>x<height>' (say '512x512') or 'auto', "
                            f"got {shown(size)}")
    return int(found.group(1)), int(found.group(2))


def _as_generate(body: ImageGeneration) -> GenerateCreate:
    """The native request this one is: the same seed draws the same pixels either way."""
    width, height = _size(body.size)
    try:
        return GenerateCreate(
            prompt=body.prompt, negative_prompt=body.negative_prompt, model=body.model,
            num_images=body.n, steps=body.steps, guidance_scale=body.guidance_scale,
            width=width, height=height, seed=body.seed, scheduler=body.scheduler)
    except ValidationError as exc:  # width and height are what `size` said
        raise RequestValidationError([
            {**e, "loc": ("body", *(_OPENAI_NAMES.get(str(p), p) for p in e["loc"])),
             "input": body.size if e["loc"][0] in ("width", "height") else e.get("input")}
            for e in exc.errors()]) from None


def _base_url(request: Request, settings: Settings) -> str:
    return (settings.public_url or str(request.base_url)).rstrip("/")


@router.post("/images/generations", response_model=ImagesResponse,
             responses=openai_errors(400, 403, 404, 409, 500, 504))
async def create_images(body: ImageGeneration, request: Request, sub: SubmitterDep,
                        registry: RegistryDep, aredis: AsyncRedisDep, holds: HoldsDep
                        ) -> Any:
    """OpenAI's `images.generate`: queues a generate job and answers once it has finished,
    with its images as signed URLs or base64 PNGs."""
    settings = sub.settings
    native = _as_generate(body)
    spec = await run_in_threadpool(resolve_generate, native, registry, settings)
    # The wait is a long poll: its place is taken before the job is queued, so a caller
    # past the bound is refused with nothing queued.
    with holds.hold(sub.caller.name):
        job = await run_in_threadpool(lambda: submit(
            sub, "generate", spec, request=body.model_dump(mode="json"),
            timeout_s=settings.generate_timeout_s, images=spec.num_images))
        if body.user:  # OpenAI's end-user id: for the operator's logs, beside the job
            log.info("images.generate for end user %r", body.user,
                     extra={"job_id": job.id, "key": sub.caller.name})
        view = await until_finished(sub.redis, aredis, job.id, sub.caller, settings,
                                    settings.openai_wait_s)
    if view["status"] in ("queued", "running"):
        raise JobUnfinished(f"job {job.id} is still {view['status']} after "
                            f"{settings.openai_wait_s:g} s (LETHE_OPENAI_WAIT_S); it goes "
                            f"on: poll GET /jobs/{job.id}")
    if view["status"] != "succeeded":
        error = view.get("error") or {}
        raise JobEndedBadly(f"job {job.id} {view['status']}: "
                            f"{error.get('message', 'see GET /jobs/' + job.id)}")
    data = await run_in_threadpool(_images, view, body.response_format, request, sub.redis,
                                   settings)
    created = int(datetime.fromisoformat(view["created_at"].replace("Z", "+00:00"))
                  .timestamp()) if view.get("created_at") else int(time.time())
    answer = ImagesResponse(created=created, data=data, job_id=job.id)
    return JSONResponse(answer.model_dump(exclude_none=True),
                        headers={"Location": f"/jobs/{job.id}"})


def _images(view: dict, response_format: str, request: Request, redis: Any,
            settings: Settings) -> list[ImageData]:
    out = []
    for index, _ in enumerate(view["result"]["images"]):
        path = image_file(view, settings, index)
        if response_format == "b64_json":
            out.append(ImageData(b64_json=base64.b64encode(path.read_bytes()).decode()))
        else:
            out.append(ImageData(url=_base_url(request, settings)
                                 + links.image_path(redis, settings, view["id"], index)))
    return out


def _model(manifest: dict[str, Any]) -> OpenAIModel:
    created = manifest.get("created_at")
    return OpenAIModel(id=manifest["id"], owned_by=manifest.get("owner") or "lethe",
                       created=int(datetime.fromisoformat(created).timestamp()) if created
                       else 0)


def _text_to_image(registry: Registry) -> list[dict[str, Any]]:
    return [m for m in registry.models() if m.get("kind") == "text-to-image"]


@router.get("/models", response_model=OpenAIModels)
def list_models(registry: RegistryDep) -> OpenAIModels:
    """The text-to-image models (edited ones included), in OpenAI's shape."""
    return OpenAIModels(data=[_model(m) for m in _text_to_image(registry)])


@router.get("/models/{model_id}", response_model=OpenAIModel, responses=openai_errors(404))
def get_model(model_id: Annotated[str, Path(pattern=MODEL_ID_PATTERN)],
              registry: RegistryDep) -> OpenAIModel:
    manifest = registry.get(model_id)
    if manifest.get("kind") != "text-to-image":
        raise ModelNotFound(f"`model` {model_id!r} is not a text-to-image model")
    return _model(manifest)


@files.get("/files/jobs/{job_id}/images/{index}", response_class=FileResponse,
           responses={200: {"content": {"image/png": {}}}, **errors(403, 404, 409, 422)})
def signed_image(job_id: str, index: int, redis: RedisDep, settings: SettingsDep,
                 expires: int = Query(..., description="Unix time the link stops working."),
                 signature: str = Query(..., max_length=100)) -> FileResponse:
    """An image by a signed link from `POST /v1/images/generations`: no key needed."""
    links.check(redis, settings, job_id, index, expires, signature)
    view = jobs.describe(jobs.fetch(redis, job_id))
    return FileResponse(image_file(view, settings, index), media_type="image/png")
