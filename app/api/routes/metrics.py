"""GET /metrics: the whole service in Prometheus' text format (``app.metrics``)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from app import metrics, workers
from app.api.deps import CallerDep, RedisDep, SettingsDep
from app.errors import Forbidden
from app.openapi import errors

router = APIRouter(tags=["health"], responses=errors(401, 403, 503))


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}},
          "description": "Prometheus exposition: jobs by type and status, queue depths, "
          "queue-wait and run-time histograms, pipeline caches, images, ESD iterations, "
          "webhook deliveries, disk use."}})
def scrape(redis: RedisDep, settings: SettingsDep, caller: CallerDep) -> Response:
    """Every API process and worker's numbers, read from Redis: one scrape sees the whole
    service. With keys configured, an admin key's (Prometheus: `authorization`)."""
    if not caller.admin:
        raise Forbidden("/metrics is for admin keys (name:key:admin in LETHE_API_KEYS)")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.ServiceCollector(redis, settings.queue_names, settings.home,
                                               workers.alive(redis)))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
