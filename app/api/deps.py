"""Dependencies as ``Annotated`` aliases: a route's signature says what it needs."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from redis import Redis

from app.config import Settings, get_settings
from app.errors import Unauthorized
from app.registry import Registry


def _redis(request: Request) -> Redis:
    return request.app.state.redis


def _registry(settings: Annotated[Settings, Depends(get_settings)]) -> Registry:
    return Registry(settings.registry_dir)


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(_redis)]
RegistryDep = Annotated[Registry, Depends(_registry)]


def require_key(request: Request, settings: SettingsDep) -> None:
    """With LETHE_API_KEYS set, every route but the health checks needs a bearer key."""
    keys = settings.keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or token.strip() not in keys:
        raise Unauthorized("a valid `Authorization: Bearer <key>` header is required")
