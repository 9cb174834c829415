"""What a worker process keeps between jobs: settings, registry, runtime and the cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

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
    _clip: Any = field(default=None, repr=False)

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

    def clip(self) -> Any:
        """The operator's CLIP model (``LETHE_CLIP_MODEL_PATH``) as a
        ``worker.features.ClipScorer``, loaded on first use; None where none is set."""
        if self._clip is None and self.settings.clip_model_path is not None:
            from worker.features import ClipScorer

            self._clip = ClipScorer(self.settings.clip_model_path, self.runtime.device)
        return self._clip

    def judge_model(self, evaluator: str | None) -> Any:
        """What judges a model's drawings: the classifier its manifest names (its domain's
        own), else the operator's CLIP model (the generic domain's judge), else None."""
        return self.cache.get(evaluator)[0] if evaluator else self.clip()


@lru_cache
def get_context() -> WorkerContext:
    return WorkerContext.from_settings(get_settings())
