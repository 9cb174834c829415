"""Every error a client can see: one class a line, mapped to HTTP in ``install_handlers``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lethe.api")


class LetheError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.message, self.details = message, details


class InvalidParams(LetheError):
    status, code = 422, "invalid_params"


class ModelNotFound(LetheError):
    status, code = 404, "model_not_found"


class JobNotFound(LetheError):
    status, code = 404, "job_not_found"


class ImageNotFound(LetheError):
    status, code = 404, "image_not_found"


class JobNotFinished(LetheError):
    status, code = 409, "job_not_finished"


class ModelExists(LetheError):
    status, code = 409, "model_exists"


class ModelProtected(LetheError):
    status, code = 409, "model_protected"


class UnsupportedMedia(LetheError):
    status, code = 415, "unsupported_media_type"


class Unauthorized(LetheError):
    status, code = 401, "unauthorized"


class TooLarge(LetheError):
    status, code = 413, "too_large"


class Unavailable(LetheError):
    status, code = 503, "unavailable"


def error_body(code: str, message: str, details: Any = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details}}


def _field(loc: tuple) -> str:
    # ("body", "steps") -> "steps"; ("body", "upscale", "steps") -> "upscale.steps"
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def validation_message(errors: list[dict]) -> str:
    """One readable line per problem, each naming the field and the value it got."""
    lines = []
    for err in errors:
        if err.get("type") == "json_invalid":
            lines.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', '')})")
            continue
        field = _field(tuple(err.get("loc", ())))
        msg = err.get("msg", "is invalid")
        if err.get("type") == "missing":
            lines.append(f"`{field}` is required")
        else:
            value = err.get("input")
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            lines.append(f"`{field}`: {msg}, got {shown}")
    return "; ".join(lines)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(LetheError)
    async def _lethe(_: Request, exc: LetheError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(
            error_body(exc.code, exc.message, exc.details), exc.status, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()
        ]
        return JSONResponse(
            error_body("invalid_params", validation_message(list(exc.errors())), errors), 422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis(_: Request, exc: Exception) -> JSONResponse:
        log.warning("redis unreachable: %s", exc)
        return JSONResponse(
            error_body("redis_unavailable", "the job store (Redis) is unreachable; retry later"),
            503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal_error", "internal error; see the server log"), 500)
