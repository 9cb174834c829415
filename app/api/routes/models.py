"""Models: list, read, delete; upload a checkpoint (POST /models); download in the format
another tool loads (GET /models/{id}/download)."""

from __future__ import annotations

import shutil
import uuid
from typing import Annotated, Any, Literal, cast, get_args

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from app import exportmeta, exports, jobfiles, jobs, quotas
from app.accounts import Caller
from app.api.deps import CallerDep, RegistryDep, SubmitterDep
from app.api.routes.jobs import CREATED, created
from app.checkpoint import CONFIG_FOLDER_KEY, PREDICTION_TYPES, read_header
from app.checkpoint import detect as detect_architecture
from app.errors import Forbidden, InvalidParams, JobNotFound, ModelProtected, TooLarge, shown
from app.jobspecs import ExportJob, ImportJob, Visibility
from app.lorakeys import UnetLayout, is_lora, match
from app.openapi import errors
from app.params import visibility
from app.registry import Registry, file_digest, reserved_ids, validate_model_id
from app.schemas import MODEL_ID_PATTERN, JobCreated, ModelChange, ModelPublic, ModelsPublic
from app.submissions import Submitted, Submitter, submit
from app.uploads import MAX_FORM_BYTES, receive_file

PathModelId = Annotated[str, Path(pattern=MODEL_ID_PATTERN)]

router = APIRouter(prefix="/models", tags=["models"], responses=errors(401))

UPLOAD_FILE = "upload.safetensors"
VISIBILITIES: tuple[str, ...] = get_args(Visibility)
_EXPORTS = uuid.UUID("6c657468-652d-6578-706f-727473000000")  # names export jobs


@router.get("", response_model=ModelsPublic)
def list_models(registry: RegistryDep) -> ModelsPublic:
    data = [ModelPublic(**m) for m in registry.models()]
    return ModelsPublic(data=data, count=len(data))


_UPLOAD_SCHEMA = {
    "type": "object", "required": ["id", "file"],
    "properties": {
        "id": {"type": "string", "pattern": MODEL_ID_PATTERN,
               "description": "The new model's id; send it before `file` to be refused early."},
        "file": {"type": "string", "format": "binary",
                 "description": "A single-file .safetensors checkpoint (SD 1.x, 2.x, SDXL "
                 "base), or a LoRA file (kohya, PEFT or diffusers' older layout) with `base`."},
        "base": {"type": "string", "pattern": MODEL_ID_PATTERN,
                 "description": "A LoRA file: the registered model it applies to; the "
                 "import is an edit of it, served at once as its variant."},
        "prediction_type": {"type": "string", "enum": list(PREDICTION_TYPES),
                            "description": "SD 2.x only: the 768 models predict v (default), "
                            "the 512 base models epsilon."},
        "visibility": {"type": "string", "enum": list(VISIBILITIES),
                       "description": "`private` (the uploader and admins see it) or "
                       "`public`; default: private when the service has API keys."}},
}


@router.post("", status_code=202, response_model=JobCreated,
             responses={**CREATED, **errors(404, 409, 413, 415)},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "multipart/form-data": {"schema": _UPLOAD_SCHEMA}}}})
async def upload_model(request: Request, sub: SubmitterDep, registry: RegistryDep) -> Any:
    """Upload a single-file checkpoint, or a LoRA file onto `base`, streamed to disk under
    `LETHE_MAX_UPLOAD_BYTES`. Its header is checked at once (a truncated file, unknown
    tensor names, a pickle, a LoRA without `base`, a LoRA key that fits no module of the
    base: 4xx); a worker then assembles and registers it: poll `Location`
    (`result.model`)."""
    settings = sub.settings
    job_id = str(uuid.uuid4())
    folder = jobfiles.output_dir(settings, job_id)
    path = folder / UPLOAD_FILE
    reserved = reserved_ids(settings)
    room, limit_name = await run_in_threadpool(_room, registry, sub)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > room + MAX_FORM_BYTES:
        raise TooLarge(f"the upload ({declared} bytes) is past what this key may still "
                       f"store: {room} bytes ({limit_name})")
    # A place among the caller's jobs before the first byte is written (``submit`` holds
    # it again for the same job).
    quotas.reserve_job(sub.redis, sub.caller.name, job_id, settings.max_active_jobs)

    def early(name: str, value: str) -> None:
        if name == "id":
            registry.check_new_id(value, "id", reserved)
        elif name == "base":
            _check_base(registry, value)

    try:
        got = await receive_file(request, "file", path, room, on_field=early,
                                 limit_name=limit_name)
        model_id = got.fields.get("id")
        if model_id is None:
            raise InvalidParams("`id` is required: the new model's id")
        registry.check_new_id(model_id, "id", reserved)
        prediction_type = got.fields.get("prediction_type") or None
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise InvalidParams(f"`prediction_type` {shown(prediction_type)} is not one of "
                                f"{list(PREDICTION_TYPES)}")
        asked = got.fields.get("visibility") or None
        if asked is not None and asked not in VISIBILITIES:
            raise InvalidParams(f"`visibility` {shown(asked)} is not one of "
                                f"{list(VISIBILITIES)}")
        # A pickle is refused by its name (never over HTTP: an operator's choice).
        filename = got.filename or UPLOAD_FILE
        header = await run_in_threadpool(read_header, path, "file", filename)
        base = got.fields.get("base") or None
        if base is not None:
            _check_base(registry, base)
            if not is_lora(header):
                raise InvalidParams(f"`base` applies to LoRA files; `file` {filename!r} holds "
                                    "no LoRA factors (a full checkpoint uploads without it)")
            layout = await run_in_threadpool(_unet_layout, registry, base)
            if layout is not None:  # else the worker, which loads the base, checks it
                match(header.shapes, layout, "file")
        elif is_lora(header):
            raise InvalidParams(f"`file` {filename!r} is a LoRA: send `base`, the id of the "
                                "model it applies to")
        elif CONFIG_FOLDER_KEY in header.metadata:
            exportmeta.check_config_folder(header.metadata, "file")
        else:
            detect_architecture(header, "file")
        exportmeta.usage(header.metadata, registry.domains(), "file")
        await run_in_threadpool(jobfiles.share, settings, path)  # for a worker elsewhere
        spec = ImportJob(id=model_id, file=str(path.relative_to(settings.outputs_dir)),
                         filename=filename, prediction_type=prediction_type, base=base,
                         visibility=visibility(cast(Visibility | None, asked), settings,
                                               base and registry.get(base)))
        # What makes a retried upload the same (read only when it carries the key).
        same = {"fields": got.fields, "filename": filename,
                "sha256": sub.idempotency_key and await run_in_threadpool(file_digest, path)}
        job = await run_in_threadpool(lambda: submit(
            sub, "import", spec, request=same, job_id=job_id,
            timeout_s=settings.train_timeout_s))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # nothing of a refused upload stays
        quotas.release_job(sub.redis, sub.caller.name, job_id)
        raise
    if job.replayed:  # the first upload is the one being imported
        shutil.rmtree(folder, ignore_errors=True)
    return created(job)


def _check_base(registry: Registry, base: str) -> None:
    validate_model_id(base, "base")
    kind = registry.get(base).get("kind")  # ModelNotFound naming it
    if kind != "text-to-image":
        raise InvalidParams(f"`base` {base!r} is a {kind}; a LoRA applies to a text-to-image "
                            "model")


def _unet_layout(registry: Registry, model_id: str) -> UnetLayout | None:
    """The UNet a LoRA for ``model_id`` applies to, read from its root base's headers on
    this host; None where the files are not here (shared storage: the worker checks)."""
    manifest = registry.get(model_id)
    while manifest.get("format") == "delta":  # an edit has its root base's modules
        manifest = registry.get(manifest["base"]["id"])
    folder = registry.local_folder(manifest["id"])
    if folder is None or not (folder / "unet" / "config.json").is_file():
        return None
    return UnetLayout.of_folder(folder / "unet")


def _room(registry: Registry, sub: Submitter) -> tuple[int, str]:
    """The bytes an upload of ``sub.caller`` may take, and the setting that bounds them:
    ``LETHE_MAX_UPLOAD_BYTES``, or what is left of the key's ``LETHE_MAX_STORAGE_BYTES``
    (the models it made) where that is less."""
    settings = sub.settings
    if settings.max_storage_bytes <= 0:
        return settings.max_upload_bytes, "LETHE_MAX_UPLOAD_BYTES"
    used = registry.bytes_of(sub.caller.name)
    left = max(0, settings.max_storage_bytes - used)
    if left < settings.max_upload_bytes:
        return left, f"LETHE_MAX_STORAGE_BYTES, {used} used"
    return settings.max_upload_bytes, "LETHE_MAX_UPLOAD_BYTES"


@router.get("/{model_id}", response_model=ModelPublic, responses=errors(404, 422))
def get_model(model_id: PathModelId, registry: RegistryDep) -> ModelPublic:
    return ModelPublic(**registry.get(model_id))


@router.get("/{model_id}/download", responses={
    200: {"content": {"application/zip": {}, "application/octet-stream": {}},
          "description": "The export: a zip of a diffusers folder, or a .safetensors file."},
    **CREATED, 202: {**CREATED[202], "model": JobCreated,
                     "description": "The export is being made: poll the job, then ask again."},
    **errors(404, 422)})
def download_model(model_id: PathModelId, registry: RegistryDep, sub: SubmitterDep,
                   format: Literal["diffusers", "single-file", "lora"] = "diffusers",
                   dtype: Literal["float32", "float16"] | None = None,
                   rank: Annotated[int | None, Query(ge=1, le=exports.MAX_RANK)] = None,
                   lora_layout: Literal["kohya", "peft"] | None = None) -> Any:
    """Download the model, an edit merged into its base: `diffusers` (a zip of the
    folder), `single-file` (the original Stable Diffusion layout, for the WebUI tools and
    `from_single_file`), or `lora` (an edit as low-rank factors for its base; `rank` fixed,
    or picked per matrix to keep 99 % of the change; `lora_layout` `kohya`, the default,
    which AUTOMATIC1111, ComfyUI, Forge, InvokeAI and diffusers read, or `peft`, diffusers'
    own). The first request makes the file (202 and the export job to poll, counted
    against the caller's jobs as any job is); once it is made, the same URL streams it.
    A model keeps its `LETHE_MAX_EXPORTS_PER_MODEL` most recently used files."""
    manifest = registry.get(model_id)
    dtype_used, rank, layout = exports.resolve(manifest, format, dtype, rank, lora_layout)
    name = exports.file_name(manifest, format, dtype_used, rank, layout)
    target = registry.export_file(model_id, name)
    if target is not None:
        registry.used_export(target)
        return FileResponse(target,
                            filename=exports.download_name(model_id, format, rank, layout),
                            media_type="application/zip" if format == "diffusers"
                            else "application/octet-stream")
    # One export job per caller and file: asking again finds it; another caller's cancel
    # never reaches it (each makes its own, and whoever finishes first files it for all).
    job_id = str(uuid.uuid5(_EXPORTS, f"{sub.caller.name}/{model_id}/{name}"))
    try:
        job = jobs.fetch(sub.redis, job_id)
        if jobs.state_of(job) in (jobs.JobState.queued, jobs.JobState.running):
            return created(Submitted(job.id, "export"))
        jobs.purge(sub.redis, job)  # an ended try (failed, canceled) gives way to a new one
    except JobNotFound:
        pass
    spec = ExportJob(model=model_id, format=format, dtype=dtype_used, rank=rank,
                     lora_layout=layout or "kohya", name=name)
    return created(submit(sub, "export", spec, request=spec.queued(), job_id=job_id,
                          timeout_s=sub.settings.train_timeout_s))


@router.patch("/{model_id}", response_model=ModelPublic,
              responses=errors(400, 403, 404, 409, 422))
def change_model(model_id: PathModelId, body: ModelChange, registry: RegistryDep,
                 caller: CallerDep) -> ModelPublic:
    """Make a model a key made `private` or `public` (its owner or an admin). A public
    model's lineage stays public: an edit of a private model cannot be made public, nor a
    model private while a public edit derives from it (409)."""
    manifest = _owned(registry, model_id, caller, "change")
    if not manifest.get("owner"):
        raise ModelProtected(f"`model` {model_id!r} is one of the service's own models, "
                             "public to every key")
    if body.visibility == "public":
        base = (manifest.get("base") or {}).get("id")
        if base and registry.visibility_of(base) == "private":
            raise ModelProtected(f"`model` {model_id!r} is an edit of the private model "
                                 f"{base!r}: make that one public first")
    elif public := registry.public_children(model_id):
        raise ModelProtected(f"`model` {model_id!r} is the base of public models "
                             f"{public}: make those private first")
    return ModelPublic(**registry.update_manifest(model_id, visibility=body.visibility))


def _owned(registry: Registry, model_id: str, caller: Caller, verb: str) -> dict[str, Any]:
    """The manifest of ``model_id`` if ``caller`` may ``verb`` it: 404 for another key's
    private model (it is not there for the caller), 403 for another's public one."""
    manifest = registry.get(model_id)
    if not caller.may_see(manifest.get("owner")):
        raise Forbidden(f"`model` {model_id!r} was made by another key; only its owner or "
                        f"an admin may {verb} it")
    return manifest


@router.delete("/{model_id}", status_code=204, responses=errors(403, 404, 409, 422))
def delete_model(model_id: PathModelId, registry: RegistryDep, caller: CallerDep) -> Response:
    """Remove a derived (edited) model; base models are protected (409). A user deletes the
    models its own jobs made (403 for another key's public model, 404 for its private
    one)."""
    _owned(registry, model_id, caller, "delete")
    registry.remove(model_id)
    return Response(status_code=204)
