"""The OpenAPI document says every answer a route can give, errors included.

Routes declare their error statuses with ``errors(...)``; each is the one error envelope
(``ErrorPublic``), with the headers it carries. ``with_error_schemas`` adds the bodies a
route reads itself (POST /upscale takes JSON or multipart) to the document's components,
so that every ``$ref`` in it resolves.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from app.schemas import UpscaleCreate


class ErrorDetail(BaseModel):
    code: str = Field(..., examples=["invalid_params"])
    message: str = Field(..., description="Names the field and the value it got.")
    details: Any = None


class ErrorPublic(BaseModel):
    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(..., examples=["invalid_request_error"])
    param: str | None = Field(None, description="The field at fault, where there is one.")
    code: str | None = None


class OpenAIErrorPublic(BaseModel):
    """The error shape of the OpenAI-compatible routes (/v1/), as OpenAI's SDKs read it."""

    error: OpenAIErrorDetail


_DESCRIPTIONS = {
    400: "A body that could not be read as text at all (not UTF-8).",
    401: "No valid `Authorization: Bearer <key>` (when LETHE_API_KEYS is set).",
    403: "The key may not do this: another key's model, or an admin-only route.",
    404: "Unknown model, job or image (another key's job reads as unknown).",
    409: "Conflict: a name that is taken, a base model, a job that has not finished, an "
         "`Idempotency-Key` used before with another body.",
    413: "A body over LETHE_MAX_BODY_BYTES, or an image over the size limits.",
    415: "A content type or image format the route does not read.",
    422: "An invalid field: the message names it and the value it got.",
    500: "The job failed (its message says why; the job stays readable at GET /jobs/{id}).",
    504: "The job was still running when the wait ran out; the message names it, to poll.",
    429: "Over a limit of the key (requests a minute, jobs at once, images a day): the "
         "message names it; retry after `Retry-After` seconds.",
    503: "Redis is unreachable or too slow (or no worker is alive): retry after "
         "`Retry-After` seconds.",
}
RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"},
                               "description": "Seconds to wait before trying again."}}
_HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Bearer`"}},
    429: RETRY_AFTER,
    503: RETRY_AFTER,
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entries for these error statuses."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorPublic, "description": _DESCRIPTIONS[status]}
        if status in _HEADERS:
            out[status]["headers"] = _HEADERS[status]
    return out


def openai_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The same, in OpenAI's error shape (the /v1/ routes; 400 stands for Lethe's 413,
    415 and 422)."""
    out = errors(*statuses)
    for entry in out.values():
        entry["model"] = OpenAIErrorPublic
    if 400 in out:
        out[400]["description"] = "An invalid field or body: `param` names the field."
    return out


def with_error_schemas(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 routes=app.routes)
            _, top = models_json_schema([(UpscaleCreate, "validation")],
                                        ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                top.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
