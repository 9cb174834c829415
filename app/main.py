"""The FastAPI application: settings, Redis on ``app.state``, one router per resource."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from app.api.deps import require_key
from app.api.routes import health, jobs, models, upscale
from app.config import get_settings
from app.errors import install_handlers
from app.limits import BodySizeLimit
from app.queue import connect


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    if not settings.redis_url:
        raise RuntimeError(
            "LETHE_REDIS_URL is not set: run `lethe serve` (it embeds a Redis) or point the "
            "API at one"
        )
    app.state.redis = connect(settings.redis_url)
    try:
        yield
    finally:
        app.state.redis.close()


def create_app() -> FastAPI:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = FastAPI(
        title="Lethe",
        version="0.1.0",
        summary="Text-to-image diffusion and concept erasure (ESD) as a service.",
        lifespan=lifespan,
    )
    install_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=get_settings().max_body_bytes)
    app.include_router(health.router)
    protected = [Depends(require_key)]
    app.include_router(jobs.router, dependencies=protected)
    app.include_router(upscale.router, dependencies=protected)
    app.include_router(models.router, dependencies=protected)
    return app


app = create_app()
