"""What a worker process keeps between jobs: settings, registry, runtime and the cache."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from app.config import Settings, get_settings
from app.registry import Registry
from worker.pipelines import PipelineCache, Runtime, load_pipeline


@dataclass
class WorkerContext:
    settings: Settings
    registry: Registry
    runtime: Runtime
    cache: PipelineCache

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        registry = Registry(settings.registry_dir)
        runtime = Runtime.resolve(settings.device, settings.dtype)

        def loader(model_id: str):
            registry.get(model_id)  # raises ModelNotFound for a model removed meanwhile
            return load_pipeline(registry.path(model_id), runtime)

        cache = PipelineCache(loader, settings.cache_max_models, settings.cache_max_bytes)
        return cls(settings, registry, runtime, cache)


@lru_cache
def get_context() -> WorkerContext:
    return WorkerContext.from_settings(get_settings())
