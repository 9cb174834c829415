"""Dependencies as ``Annotated`` aliases: a route's signature says what it needs."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from app.config import Settings, get_settings
from app.registry import Registry


def _redis(request: Request) -> Redis:
    return request.app.state.redis


def _async_redis(request: Request) -> AsyncRedis:
    return request.app.state.async_redis


def _registry(settings: Annotated[Settings, Depends(get_settings)]) -> Registry:
    return Registry(settings.registry_dir)


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(_redis)]
# For reads that block in Redis (event streams, long polls) without holding a thread.
AsyncRedisDep = Annotated[AsyncRedis, Depends(_async_redis)]
RegistryDep = Annotated[Registry, Depends(_registry)]


_bearer = HTTPBearer(auto_error=False, description="A key from LETHE_API_KEYS.")


def documents_bearer(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """Declares the bearer scheme in the OpenAPI document. The key itself is checked by
    ``app.middleware.ApiKeys``, before anything reads the request's body."""
