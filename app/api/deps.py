"""Dependencies as ``Annotated`` aliases: a route's signature says what it needs."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from app import idempotency
from app.accounts import Caller
from app.config import Settings, get_settings
from app.holds import Holds
from app.middleware import caller_of
from app.registry import Registry, open_registry
from app.submissions import Submitter


def _redis(request: Request) -> Redis:
    return request.app.state.redis


def _async_redis(request: Request) -> AsyncRedis:
    return request.app.state.async_redis


def _registry(request: Request, settings: Annotated[Settings, Depends(get_settings)]
              ) -> Registry:
    # As the caller sees it: another key's private models are not there.
    return open_registry(settings).seen_by(caller_of(request.scope))


def _holds(request: Request) -> Holds:
    return request.app.state.holds


def _caller(request: Request) -> Caller:
    return caller_of(request.scope)


def _submitter(request: Request, settings: Annotated[Settings, Depends(get_settings)],
               key: Annotated[str | None, Header(
                   alias=idempotency.HEADER, description="Makes a retried submission "
                   "safe: the same key and body within 24 h answer with the first "
                   "request's job (`Idempotent-Replayed: true`); another body, 409.")] = None,
               ) -> Submitter:
    return Submitter(request.app.state.redis, settings, caller_of(request.scope),
                     idempotency.validate(key))


SettingsDep = Annotated[Settings, Depends(get_settings)]
CallerDep = Annotated[Caller, Depends(_caller)]
SubmitterDep = Annotated[Submitter, Depends(_submitter)]
RedisDep = Annotated[Redis, Depends(_redis)]
# For reads that block in Redis (event streams, long polls) without holding a thread.
AsyncRedisDep = Annotated[AsyncRedis, Depends(_async_redis)]
RegistryDep = Annotated[Registry, Depends(_registry)]
# The bound on event streams and long polls (``app.holds``).
HoldsDep = Annotated[Holds, Depends(_holds)]


_bearer = HTTPBearer(auto_error=False, description="A key from LETHE_API_KEYS.")


def documents_bearer(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """Declares the bearer scheme in the OpenAPI document. The key itself is checked by
    ``app.middleware.ApiKeys``, before anything reads the request's body."""
