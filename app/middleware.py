"""ASGI wrappers that act before any route reads a request: key check, request rate, body
limit, headers.

They are plain ASGI, not FastAPI dependencies, because order matters: a request without a
valid key is refused before its body is parsed (broken JSON from a stranger is a 401, not
a 422), and an oversized body is a 413 however the route was reading it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import quotas
from app.accounts import ANONYMOUS, Caller
from app.api.handlers import shaped
from app.errors import RateLimited

log = logging.getLogger("lethe.api")

# Routes anyone may call: liveness, readiness, the API's own description, the web UI's
# static files (the page asks for the key; every call it makes carries it), and images by
# signed link (the signature is the permission: app.links).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/redoc",
                        "/docs/oauth2-redirect"})
OPEN_PREFIXES = ("/docs/static/", "/ui", "/files/")


async def _send_error(scope: Scope, send: Send, status: int, code: str, message: str,
                      details: Any = None, headers: Iterable[tuple[bytes, bytes]] = ()
                      ) -> None:
    """An error answer in the shape of the route asked for (``app.api.handlers.shaped``)."""
    status, body = shaped(scope["path"], status, code, message, details)
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


def key_matches(token: str, keys: Iterable[str]) -> bool:
    """Whether ``token`` is one of ``keys``, compared in constant time."""
    return _matching(token, {key: ANONYMOUS for key in keys}) is not None


def _matching(token: str, keys: Mapping[str, Caller]) -> Caller | None:
    """The caller whose key ``token`` is, compared in constant time: every key is compared,
    and each comparison takes as long whatever the common prefix."""
    found = None
    for key, caller in keys.items():
        if hmac.compare_digest(token.encode(), key.encode()):
            found = caller
    return found


def caller_of(scope: Scope) -> Caller:
    """Who made the request (``ApiKeys`` put it there); the open service's one caller."""
    return scope.get("state", {}).get("caller", ANONYMOUS)


class ApiKeys:
    """With keys configured, every route but the open ones needs ``Bearer <key>``; the
    key's caller goes into the request's state for the routes (``caller_of``)."""

    def __init__(self, app: ASGIApp, keys: Mapping[str, Caller]):
        self.app, self.keys = app, dict(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or self._open(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        caller = _matching(token.strip(), self.keys) if scheme.lower() == "bearer" else None
        if caller is not None:
            scope.setdefault("state", {})["caller"] = caller
            await self.app(scope, receive, send)
            return
        await _send_error(scope, send, 401, "unauthorized",
                          "a valid `Authorization: Bearer <key>` header is required",
                          headers=[(b"www-authenticate", b"Bearer")])

    @staticmethod
    def _open(path: str) -> bool:
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class RequestRate:
    """At most ``per_minute`` requests a minute per caller (``app.quotas``), counted in
    Redis across API processes; the open routes are not counted. If Redis does not answer
    the count is skipped: the route itself will say that Redis is away."""

    def __init__(self, app: ASGIApp, per_minute: int):
        self.app, self.per_minute = app, per_minute

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or self.per_minute <= 0
                or ApiKeys._open(scope["path"])):
            await self.app(scope, receive, send)
            return
        aredis = scope["app"].state.async_redis
        try:
            await asyncio.wait_for(quotas.check_request(
                aredis, caller_of(scope).name, self.per_minute), 2)
        except RateLimited as exc:
            wait_s = str(max(1, math.ceil(exc.details["retry_after_s"])))
            await _send_error(scope, send, 429, exc.code, exc.message, exc.details,
                              [(b"retry-after", wait_s.encode())])
            return
        except (RedisError, asyncio.TimeoutError):
            log.warning("request rate not counted: Redis did not answer")
        await self.app(scope, receive, send)


class BodySizeLimit:
    """A request body limit enforced while reading, so an oversized upload never fills
    memory: past ``max_bytes`` (declared or, when sent chunked, counted) the answer is 413,
    whatever the route made of the interrupted read."""

    def __init__(self, app: ASGIApp, max_bytes: int, routes: dict[str, int] | None = None):
        # ``routes``: paths with a limit of their own (the checkpoint upload), which their
        # route enforces with a message naming its field; this is the backstop.
        self.app, self.max_bytes, self.routes = app, max_bytes, routes or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.routes.get(scope["path"], self.max_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await self._reject(scope, send, int(declared), max_bytes)
            return
        seen, exceeded, started = 0, False, False

        async def limited() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                exceeded = True
                raise _TooLarge(seen)
            return message

        async def send_unless_exceeded(message: Message) -> None:
            # FastAPI turns any error while it reads a JSON body into a 400; past the
            # limit the answer is ours.
            nonlocal started
            if not exceeded:
                started |= message["type"] == "http.response.start"
                await send(message)

        try:
            await self.app(scope, limited, send_unless_exceeded)
        except _TooLarge:
            pass
        if exceeded and not started:
            await self._reject(scope, send, seen, max_bytes)

    async def _reject(self, scope: Scope, send: Send, size: int, max_bytes: int) -> None:
        await _send_error(scope, send, 413, "too_large", f"request body must be at most "
                          f"{max_bytes} bytes, got {size} or more")


class _TooLarge(Exception):
    def __init__(self, size: int):
        self.size = size


class SecurityHeaders:
    """Headers every answer carries: no MIME sniffing of what the service sends."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"x-content-type-options", b"nosniff")]
            await send(message)

        await self.app(scope, receive, with_headers)
