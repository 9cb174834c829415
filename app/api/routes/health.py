from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from rq import Worker

from app.api.deps import RedisDep
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """Liveness: the API process answers."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(redis: RedisDep) -> JSONResponse:
    """Readiness: Redis answers and at least one worker is alive."""
    try:
        redis.ping()
        workers = len(Worker.all(connection=redis))
    except RedisError as exc:
        body = Health(status="unavailable", redis=False, detail=f"redis: {exc}")
        return JSONResponse(body.model_dump(), 503)
    if workers == 0:
        body = Health(status="unavailable", redis=True, workers=0, detail="no worker is alive")
        return JSONResponse(body.model_dump(), 503)
    return JSONResponse(Health(status="ok", redis=True, workers=workers).model_dump())
