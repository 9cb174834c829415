"""ASGI wrappers that act before any route reads a request: key check, body limit, headers.

They are plain ASGI, not FastAPI dependencies, because order matters: a request without a
valid key is refused before its body is parsed (broken JSON from a stranger is a 401, not
a 422), and an oversized body is a 413 however the route was reading it.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.handlers import error_body

# Routes anyone may call: liveness, readiness, the API's own description, and the web UI's
# static files (the page asks for the key; every call it makes carries it).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/redoc",
                        "/docs/oauth2-redirect"})
OPEN_PREFIXES = ("/docs/static/", "/ui")


async def _send_json(send: Send, status: int, body: dict,
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


def key_matches(token: str, keys: Iterable[str]) -> bool:
    """Whether ``token`` is one of ``keys``, compared in constant time: every key is
    compared, and each comparison takes as long whatever the common prefix."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


class ApiKeys:
    """With keys configured, every route but the open ones needs ``Bearer <key>``."""

    def __init__(self, app: ASGIApp, keys: Iterable[str]):
        self.app, self.keys = app, tuple(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or self._open(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and key_matches(token.strip(), self.keys):
            await self.app(scope, receive, send)
            return
        await _send_json(send, 401, error_body(
            "unauthorized", "a valid `Authorization: Bearer <key>` header is required"),
            [(b"www-authenticate", b"Bearer")])

    @staticmethod
    def _open(path: str) -> bool:
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


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
            await self._reject(send, int(declared), max_bytes)
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
            await self._reject(send, seen, max_bytes)

    async def _reject(self, send: Send, size: int, max_bytes: int) -> None:
        await _send_json(send, 413, error_body(
            "too_large", f"request body must be at most {max_bytes} bytes, got {size} "
            "or more"))


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
