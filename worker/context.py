"""What a worker process keeps between jobs: settings, registry, runtime and the cache."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

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
            manifest = registry.get(model_id)  # ModelNotFound for one removed meanwhile
            if manifest["format"] == "delta":
                from worker.variants import build_variant, load_delta

                base_id = manifest["base"]["id"]
                base, _ = cache.get(base_id)  # cached base: no disk read of its weights
                return build_variant(base, load_delta(registry.path(model_id)), base_id)
            if manifest["format"] == "shapes-classifier":
                from worker.domains.shapes.classifier import ShapesClassifier

                return ShapesClassifier.from_pretrained(
                    registry.path(model_id), torch_dtype=torch.float32
                ).to(runtime.device).eval()
            return load_pipeline(registry.path(model_id), runtime)

        cache = PipelineCache(loader, settings.cache_max_models, settings.cache_max_bytes)
        return cls(settings, registry, runtime, cache)


@lru_cache
def get_context() -> WorkerContext:
    return WorkerContext.from_settings(get_settings())
