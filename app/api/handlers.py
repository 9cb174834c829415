"""Errors as HTTP answers: every ``app.errors`` class, FastAPI's validation errors, routing
errors and an unreachable Redis, each as ``{"error": {code, message, details}}``."""

from __future__ import annotations

import logging
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
    async def _lethe(_: Request, exc: LetheError) -> JSONResponse:
        headers = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": RETRY_AFTER_S},
                   429: {"Retry-After": str(max(1, (exc.details or {}).get("retry_after_s", 1)))}
                   }.get(exc.status)
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
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message, headers = str(exc.detail), exc.headers
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the first route on the path only
            # (GET /jobs/{id} without DELETE): a 405 must list them all (RFC 9110).
            allowed = ", ".join(_allowed_methods(request))
            message = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
            headers = {"Allow": allowed}
        return JSONResponse(error_body(code, message[:300]), exc.status_code, headers=headers)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis(_: Request, exc: Exception) -> JSONResponse:
        log.warning("redis unreachable: %s", exc)
        return JSONResponse(
            error_body("redis_unavailable", "the job store (Redis) is unreachable; retry later"),
            503,
            headers={"Retry-After": RETRY_AFTER_S},
        )

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal_error", "internal error; see the server log"), 500)
