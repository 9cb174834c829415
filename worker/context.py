"""What a worker process keeps between jobs: settings, registry, runtime and the cache."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from app.config import Settings, get_settings
from app.registry import Registry, open_registry
from worker.domains import get_domain
from worker.pipelines import PipelineCache, Runtime, load_pipeline


@dataclass
class WorkerContext:
    settings: Settings
    registry: Registry
    runtime: Runtime
    cache: PipelineCache

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        registry = open_registry(settings)
        runtime = Runtime.resolve(settings.device, settings.dtype)

        def loader(model_id: str):
            manifest = registry.get(model_id)  # ModelNotFound for one removed meanwhile
            if manifest["format"] == "delta":
                from worker.variants import build_variant, load_delta

                base_id = manifest["base"]["id"]
                base, _ = cache.get(base_id)  # cached base: no disk read of its weights
                return build_variant(base, load_delta(registry.path(model_id)), base_id)
            if manifest["kind"] == "classifier":
                # A domain's judge; "<domain>-classifier" names it in manifests that predate
                # the field.
                domain = manifest.get("domain") or manifest["format"].removesuffix(
                    "-classifier")
                return get_domain(domain).load_classifier(registry.path(model_id),
                                                          runtime.device)
            return load_pipeline(registry.path(model_id), runtime)

        cache = PipelineCache(loader, settings.cache_max_models, settings.cache_max_bytes)
        return cls(settings, registry, runtime, cache)


@lru_cache
def get_context() -> WorkerContext:
    return WorkerContext.from_settings(get_settings())
