"""Signed image URLs: what ``POST /v1/images/generations`` answers with for
``response_format: url``.

OpenAI's clients show or fetch such URLs as they are, without the API key, so the URL
carries its own permission: an expiry and an HMAC-SHA256 over the job, the image and that
expiry (the scheme of S3's presigned URLs). The secret is ``LETHE_URL_SECRET`` or, unset,
a random one that the first API process stores in Redis for all of them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from redis import Redis

from app.config import Settings
from app.errors import Forbidden

_SECRET_KEY = "lethe:url-secret"
_secrets: dict[str, bytes] = {}  # per Redis URL: read once per process


def _secret(connection: Redis, settings: Settings) -> bytes:
    if settings.url_secret:
        return settings.url_secret.encode()
    url = settings.redis_url or ""
    if url not in _secrets:
        connection.set(_SECRET_KEY, secrets.token_hex(32), nx=True)
        stored = connection.get(_SECRET_KEY) or b""
        _secrets[url] = stored.encode() if isinstance(stored, str) else stored
    return _secrets[url]


def _signature(secret: bytes, job_id: str, index: int, expires: int) -> str:
    mac = hmac.new(secret, f"{job_id}/{index}/{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def image_path(connection: Redis, settings: Settings, job_id: str, index: int) -> str:
    """The path (with its query) at which image ``index`` of ``job_id`` can be fetched
    without a key until ``url_ttl_s`` from now."""
    expires = int(time.time()) + settings.url_ttl_s
    signature = _signature(_secret(connection, settings), job_id, index, expires)
    return f"/files/jobs/{job_id}/images/{index}?expires={expires}&signature={signature}"


def check(connection: Redis, settings: Settings, job_id: str, index: int, expires: int,
          signature: str) -> None:
    """``Forbidden`` unless the signature is this service's for this image and expiry,
    and the expiry has not passed."""
    wanted = _signature(_secret(connection, settings), job_id, index, expires)
    if not hmac.compare_digest(wanted.encode(), signature.encode()):
        raise Forbidden("`signature` does not match this image and expiry")
    if expires < time.time():
        raise Forbidden(f"`expires`: this link expired at {expires} (unix time); ask for "
                        "the image again")
