from __future__ import annotations

from collections import Counter

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from app import workers
from app.api.deps import RedisDep
from app.api.handlers import RETRY_AFTER_S
from app.openapi import RETRY_AFTER
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """Liveness: the API process answers."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health,
            responses={503: {"model": Health, "headers": RETRY_AFTER}})
def readyz(redis: RedisDep) -> JSONResponse:
    """Readiness: Redis answers and at least one worker is alive (it beat within its TTL)."""
    try:
        live = workers.alive(redis)
    except RedisError as exc:
        # The exception's text names the socket or host: this machine's, not the caller's.
        body = Health(status="unavailable", redis=False,
                      detail=f"redis: unreachable ({type(exc).__name__})")
    else:
        queues = Counter(q for info in live.values() for q in info.get("queues", []))
        body = Health(status="ok" if live else "unavailable", redis=True, workers=len(live),
                      queues=dict(queues), detail=None if live else "no worker is alive")
    if body.status == "ok":
        return JSONResponse(body.model_dump())
    return JSONResponse(body.model_dump(), 503, headers={"Retry-After": RETRY_AFTER_S})
