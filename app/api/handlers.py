"""Errors as HTTP answers: every ``app.errors`` class, FastAPI's validation errors, routing
errors and an unreachable Redis, each as ``{"error": {code, message, details}}`` — or, on
the OpenAI-compatible routes (``/v1/``), in OpenAI's shape and with its status codes
(``{"error": {message, type, param, code}}``; 400 where Lethe says 422), which the
``openai`` SDKs turn into their own exception classes."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.errors import LetheError, shown

log = logging.getLogger("lethe.api")

# What a 503 asks a client to wait before it tries again.
RETRY_AFTER_S = "5"


def error_body(code: str, message: str, details: Any = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details}}


OPENAI_PREFIX = "/v1/"
# OpenAI answers an invalid request 400, whatever Lethe's finer status says.
_OPENAI_STATUS = {413: 400, 415: 400, 422: 400}
_OPENAI_TYPE = {401: "invalid_request_error", 403: "permission_error",
                429: "rate_limit_error"}
_PARAM = re.compile(r"`([A-Za-z_][A-Za-z0-9_.]*)`")


def shaped(path: str, status: int, code: str, message: str, details: Any = None,
           param: str | None = None) -> tuple[int, dict]:
    """The status and body of an error answer on ``path``: Lethe's shape, or OpenAI's on
    ``/v1/`` (``param``: the field at fault, else the first one the message names)."""
    if not path.startswith(OPENAI_PREFIX):
        return status, error_body(code, message, details)
    status = _OPENAI_STATUS.get(status, status)
    kind = _OPENAI_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if param is None:
        named = _PARAM.search(message)
        param = named.group(1) if named else None
    if status == 401:
        code = "invalid_api_key"  # what OpenAI calls it; its SDKs raise AuthenticationError
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _answer(request: Request, status: int, code: str, message: str, details: Any = None,
            headers: Mapping[str, str] | None = None, param: str | None = None
            ) -> JSONResponse:
    status, body = shaped(request.url.path, status, code, message, details, param)
    return JSONResponse(body, status, headers=headers)


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
            lines.append(f"`{field}`: {msg}, got {shown(err.get('input'))}")
    return "; ".join(lines)


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route answers on this request's path (a route matches FULL only
    with its own path and method)."""
    routes = request.app.router.routes
    return [method for method in ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL
                   for route in routes)]


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(LetheError)
    async def _lethe(request: Request, exc: LetheError) -> JSONResponse:
        headers = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": RETRY_AFTER_S},
                   429: {"Retry-After": str(max(1, (exc.details or {}).get("retry_after_s", 1)))},
                   # The job behind it exists (and may run on): OpenAI's SDKs retry 5xx
                   # answers unless told not to, which would queue it again.
                   500: {"x-should-retry": "false"}, 504: {"x-should-retry": "false"},
                   }.get(exc.status)
        return _answer(request, exc.status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()
        ]
        first = _field(tuple(errors[0].get("loc", ()))) if errors else None
        return _answer(request, 422, "invalid_params", validation_message(list(exc.errors())),
                       errors, param=first)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message, headers = str(exc.detail), exc.headers
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the first route on the path only
            # (GET /jobs/{id} without DELETE): a 405 must list them all (RFC 9110).
            allowed = ", ".join(_allowed_methods(request))
            message = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
            headers = {"Allow": allowed}
        return _answer(request, exc.status_code, code, message[:300], headers=headers)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis(request: Request, exc: Exception) -> JSONResponse:
        log.warning("redis unreachable: %s", exc)
        return _answer(request, 503, "redis_unavailable",
                       "the job store (Redis) is unreachable; retry later",
                       headers={"Retry-After": RETRY_AFTER_S})

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _answer(request, 500, "internal_error", "internal error; see the server log")
