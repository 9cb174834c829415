"""POST /upscale: an uploaded image (multipart or base64 JSON) or an earlier job's output, ×4.

The API checks every image before it is queued (``app.images``) and stores it as a plain
PNG in the new job's output folder; the worker reads only that file.
"""

from __future__ import annotations

import hashlib
import uuid
from types import SimpleNamespace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import jobfiles, webhooks
from app.api.deps import RegistryDep, SubmitterDep
from app.api.routes.jobs import CREATED, created
from app.errors import InvalidParams, UnsupportedMedia, shown
from app.images import decode_base64, open_checked, save_input
from app.openapi import errors
from app.params import SCALE, resolve_source, resolve_upscale
from app.schemas import HOOK_FIELDS, JobCreated, UpscaleCreate, UpscaleOptions
from app.submissions import Submitter, submit

router = APIRouter(tags=["jobs"], responses=errors(401, 503))

INPUT_FILE = "input.png"


def _invalid(exc: ValidationError) -> RequestValidationError:
    # The same 422 envelope as any other body, field names and values included.
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])


_MULTIPART_SCHEMA = {
    "type": "object", "required": ["image"],
    "properties": {"image": {"type": "string", "format": "binary"},
                   **{k: {"type": "string"} for k in UpscaleOptions.model_fields},
                   "webhook": {"type": "string"},
                   "webhook_events": {"type": "string", "description": "Comma-separated: "
                                      "started, progress, completed."}},
}


def _form_webhook(fields: dict[str, Any], sub: Submitter) -> dict[str, Any] | None:
    """The webhook a multipart upload asks for (its form fields taken out of ``fields``):
    ``webhook_events`` comma-separated, as a form has no lists."""
    url = fields.pop("webhook", None)
    events = fields.pop("webhook_events", None)
    if url is None:
        if events is not None:
            raise InvalidParams("`webhook_events` without a `webhook` URL")
        return None
    kinds = [e.strip() for e in (events or "completed").split(",") if e.strip()]
    unknown = [k for k in kinds if k not in webhooks.EVENTS]
    if unknown or not kinds:
        raise InvalidParams(f"`webhook_events` must name some of {list(webhooks.EVENTS)}, "
                            f"got {shown(events)}")
    return webhooks.of_request(SimpleNamespace(webhook=str(url), webhook_events=kinds), sub)


@router.post(
    "/upscale", status_code=202, response_model=JobCreated,
    responses={**CREATED, **errors(409, 415)},
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/UpscaleCreate"}},
        "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
    }}},
)
async def create_upscale(request: Request, sub: SubmitterDep, registry: RegistryDep) -> Any:
    """Queue a ×4 upscale of an upload (multipart `image`, or base64 `image` in JSON) or of
    an earlier job's image (`source`); poll `Location` for the result."""
    redis, settings = sub.redis, sub.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    job_id = str(uuid.uuid4())
    data: bytes | None = None
    if ctype == "multipart/form-data":
        # Room for one of each field and one more, so that a repeat is ours to name.
        try:
            form = await request.form(
                max_files=2, max_fields=len(UpscaleOptions.model_fields) + len(HOOK_FIELDS) + 2)
        except StarletteHTTPException as exc:  # starlette's word on a malformed body
            raise InvalidParams(f"multipart body: {exc.detail}") from None
        names = [name for name, _ in form.multi_items()]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise InvalidParams(f"`{repeated[0]}` is given more than once; send each field "
                                "once")
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise InvalidParams("`image`: a multipart request needs a file field named `image`")
        data = await upload.read()
        fields = {k: v for k, v in form.multi_items() if k != "image"}
        same = {"form": dict(fields), "image": hashlib.sha256(data).hexdigest()}
        hook = await run_in_threadpool(_form_webhook, fields, sub)
        try:
            # Form fields are text: parsed as their JSON types ("2" is a step count).
            options: UpscaleOptions = UpscaleOptions.model_validate_strings(fields)
        except ValidationError as exc:
            raise _invalid(exc) from None
        source = None
    elif ctype in ("application/json", ""):
        raw = await request.body()
        try:
            body = UpscaleCreate.model_validate_json(raw)
        except ValidationError as exc:
            raise _invalid(exc) from None
        options, source = body, body.source
        same = body.model_dump(mode="json")
        hook = await run_in_threadpool(webhooks.of_request, body, sub)
        if body.image is not None:
            data = decode_base64(body.image)
    else:
        raise UnsupportedMedia(f"content type {ctype!r} is not accepted; send "
                               "multipart/form-data or application/json")

    # Registry files, Redis and the image codec all block: they run off the event loop.
    if source is not None:
        rel, source_prompt = await run_in_threadpool(resolve_source, source, redis, settings,
                                                     sub.caller)
        spec = await run_in_threadpool(resolve_upscale, options, registry, settings,
                                       prompt=source_prompt, input=rel,
                                       source=source.model_dump())
    elif data is not None:
        spec = await run_in_threadpool(resolve_upscale, options, registry, settings,
                                       input=f"{job_id}/{INPUT_FILE}")
        image = await run_in_threadpool(
            open_checked, data, max(settings.max_upscale_side // SCALE, 1))
        stored_at = jobfiles.output_dir(settings, job_id) / INPUT_FILE
        await run_in_threadpool(save_input, image, stored_at)
        await run_in_threadpool(jobfiles.share, settings, stored_at)
    else:  # unreachable: UpscaleCreate asks for exactly one of the two
        raise InvalidParams("give exactly one of `image` and `source`")
    try:
        job = await run_in_threadpool(lambda: submit(
            sub, "upscale", spec, request=same, timeout_s=settings.generate_timeout_s,
            images=1, job_id=job_id, webhook=hook))
    except BaseException:
        # Not queued (Redis unreachable, say): the stored upload belongs to no job.
        await run_in_threadpool(jobfiles.discard, settings, job_id)
        raise
    if job.replayed:  # an earlier request's job has its own copy of the image
        await run_in_threadpool(jobfiles.discard, settings, job_id)
    return created(job)
