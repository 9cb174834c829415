"""The FastAPI application: settings, Redis on ``app.state``, one router per resource."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from app import jobfiles, logs
from app.api.deps import documents_bearer
from app.api.handlers import install_handlers
from app.api.routes import domains, health, jobs, metrics, models, upscale, v1, webhooks
from app.config import Settings, get_settings
from app.holds import Holds
from app.middleware import ApiKeys, BodySizeLimit, RequestRate, SecurityHeaders
from app.openapi import with_error_schemas
from app.queue import connect, connect_async
from app.webhooks import Deliverer

UI_DIR = Path(__file__).parent / "ui"
log = logging.getLogger("lethe.api")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    if not settings.redis_url:
        raise RuntimeError(
            "LETHE_REDIS_URL is not set: run `lethe serve` (it embeds a Redis) or point the "
            "API at one"
        )
    app.state.redis = connect(settings.redis_url)
    # Per key only where there are keys: the open service's one caller has the whole.
    app.state.holds = Holds(settings.max_holds_per_key if settings.keys else settings.max_holds,
                            settings.max_holds)
    # The streams and long polls it holds, and a few connections more for the rest.
    app.state.async_redis = connect_async(settings.redis_url,
                                          max_connections=settings.max_holds + 16)
    tasks = []
    if settings.storage_url:  # copies fetched from shared storage are this host's to reap
        tasks.append(asyncio.create_task(_reap_forever(app, settings)))
    deliveries = None
    if settings.webhook_secret:  # without a secret no job may ask for a webhook
        deliverer = Deliverer(app.state.async_redis, settings.webhook_secret,
                              settings.webhook_retry_base_s, settings.result_ttl_s,
                              allow=settings.webhook_hosts)
        deliveries = asyncio.create_task(deliverer.run())
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        if deliveries is not None:
            deliveries.cancel()
            with contextlib.suppress(BaseException):  # it ends here, whatever it was doing
                await asyncio.wait_for(deliveries, 2)
        app.state.redis.close()
        # A stalled Redis must not hold the shutdown: closing waits on its sockets.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(app.state.async_redis.aclose(), 2)


async def _reap_forever(app: FastAPI, settings: Settings) -> None:
    """With shared storage the API keeps copies of the images it serves: swept like a
    worker's files (``jobfiles.sweep``), every ``reap_interval_s``."""
    while True:
        await asyncio.sleep(settings.reap_interval_s)
        try:
            await run_in_threadpool(jobfiles.sweep, app.state.redis, settings)
        except Exception:  # Redis or the store away: the next round tries again
            log.warning("sweeping job files failed", exc_info=True)


def create_app() -> FastAPI:
    settings = get_settings()
    logs.configure(settings.log_format)
    # The docs page's scripts ship with the package (fastapi-offline): no CDN at run time.
    app = FastAPIOffline(
        title="Lethe",
        version="0.1.0",
        summary="Text-to-image diffusion and concept erasure (ESD) as a service.",
        lifespan=lifespan,
        static_url="/docs/static",
    )
    install_handlers(app)
    # Outermost last: headers on every answer, then the key, the caller's request rate,
    # then the body limit.
    # A checkpoint upload: its multipart framing on top of the largest file allowed.
    upload_limit = settings.max_upload_bytes + 64 * 1024
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes,
                       routes={"/models": upload_limit})
    app.add_middleware(RequestRate, per_minute=settings.rate_limit_per_minute)
    app.add_middleware(ApiKeys, keys=settings.keys)
    app.add_middleware(SecurityHeaders)
    app.include_router(health.router)
    # The key is checked by ApiKeys before a body is read; the dependency documents it.
    protected = [Depends(documents_bearer)] if settings.keys else []
    app.include_router(jobs.router, dependencies=protected)
    app.include_router(upscale.router, dependencies=protected)
    app.include_router(models.router, dependencies=protected)
    app.include_router(domains.router, dependencies=protected)
    app.include_router(metrics.router, dependencies=protected)
    app.include_router(webhooks.router, dependencies=protected)
    app.include_router(v1.router, dependencies=protected)
    app.include_router(v1.files)
    # The web UI: static files committed as they are served (no build step), calling the
    # API like any client; the pages load without a key, the API calls need one.
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
    with_error_schemas(app)
    return app


app = create_app()
