"""Loading registry models into diffusers pipelines, and the LRU cache that keeps them.

A worker keeps its pipelines in memory between jobs: loading a model costs far more than a
few denoising steps. The cache is bounded both by count and by the bytes of the tensors
it holds; the least recently used pipeline goes first.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

log = logging.getLogger("lethe.worker.pipelines")

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}

# Set on top of the model's own scheduler config. PNDM as Stable Diffusion ships it: PLMS
# steps only; its Runge-Kutta warm-up needs more steps than a request may ask (1 to 3
# steps failed with a shape error).
SCHEDULER_OPTIONS: dict[str, dict[str, Any]] = {"pndm": {"skip_prk_steps": True}}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def resolve(cls, device: str = "auto", dtype: str = "auto") -> Runtime:
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                           else ("cpu" if device == "auto" else device))
        if dtype == "auto":
            dt = torch.float16 if dev.type == "cuda" else torch.float32
        else:
            dt = getattr(torch, dtype)
        return cls(dev, dt)


def pipeline_bytes(pipe: DiffusionPipeline | torch.nn.Module) -> int:
    """Bytes of every parameter and buffer the pipeline's modules (or a module) hold."""
    total = 0
    components = {"model": pipe} if isinstance(pipe, torch.nn.Module) else pipe.components
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in component.parameters())
            total += sum(t.numel() * t.element_size() for t in component.buffers())
    return total


def with_scheduler(pipe: DiffusionPipeline, name: str) -> DiffusionPipeline:
    """A pipeline sharing every module of ``pipe`` with its own fresh scheduler.

    A scheduler holds per-run state (timesteps, step index), so concurrent or consecutive
    requests must never share one; building the pipeline object itself is cheap.
    """
    return rebuild(pipe, scheduler=SCHEDULERS[name].from_config(
        pipe.scheduler.config, **SCHEDULER_OPTIONS.get(name, {})))


def rebuild(pipe: DiffusionPipeline, **replace: Any) -> DiffusionPipeline:
    """A new pipeline object over ``pipe``'s components, with some replaced."""
    kwargs = {**pipe.components, **replace}
    if "requires_safety_checker" in inspect.signature(pipe.__class__).parameters:
        # Keep the loaded pipeline's choice (and skip its warning on every request).
        kwargs["requires_safety_checker"] = pipe.config.get("requires_safety_checker", False)
    view = pipe.__class__(**kwargs)
    view.set_progress_bar_config(disable=True)
    return view


def save_pipeline(pipe: DiffusionPipeline, folder: Path) -> Path:
    """``pipe.save_pretrained`` (safetensors), its folder loading in one dtype everywhere.

    transformers 5 loads a text encoder in the dtype its config names (float16 for half
    weights) where diffusers loads its own models in float32 unless asked, so a plain
    ``from_pretrained(folder)`` of half weights mixes the two and fails at the first call
    ("mat1 and mat2 must have the same dtype"). Each transformers config is told float32,
    as diffusers' defaults are; a ``torch_dtype`` given at load still wins."""
    import json

    pipe.save_pretrained(folder, safe_serialization=True)
    for config in Path(folder).glob("*/config.json"):
        values = json.loads(config.read_text())
        if "transformers_version" in values and values.get("dtype") not in (None, "float32"):
            config.write_text(json.dumps({**values, "dtype": "float32"}, indent=2) + "\n")
    return Path(folder)


def load_pipeline(path: Path, runtime: Runtime) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(
        path, torch_dtype=runtime.dtype, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    takes_flag = "requires_safety_checker" in inspect.signature(pipe.__class__).parameters
    if takes_flag and getattr(pipe, "safety_checker", None) is None:
        # Models without a safety checker are normal here; stop diffusers' warning per call.
        pipe.register_to_config(requires_safety_checker=False)
    return pipe.to(runtime.device)


@dataclass
class CacheStats:
    hits: int = 0
    loads: int = 0
    evictions: int = 0


@dataclass
class Loaded:
    """What a loader may return instead of a bare pipeline: its true cost and its base.

    An edited variant shares every unchanged tensor with its cached base, so it costs only
    its delta; it stays usable only while the base's tensors do, so evicting a base evicts
    its variants too.
    """

    pipe: Any
    bytes: int
    base: str | None = None


class PipelineCache:
    """LRU of loaded pipelines keyed by model id, bounded by ``max_models`` and ``max_bytes``."""

    def __init__(self, loader: Callable[[str], Any], max_models: int, max_bytes: int):
        self._loader = loader
        self.max_models, self.max_bytes = max_models, max_bytes
        self._items: OrderedDict[str, Loaded] = OrderedDict()
        # Re-entrant: loading a variant gets its base from this same cache.
        self._lock = threading.RLock()
        self.stats = CacheStats()

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return sum(item.bytes for item in self._items.values())

    def size_of(self, key: str) -> int:
        return self._items[key].bytes

    def get(self, key: str) -> tuple[Any, bool]:
        """Return (pipeline, was_cached)."""
        with self._lock:
            if key in self._items:
                item = self._items[key]
                if item.base:  # using a variant uses its base's tensors
                    self._items.move_to_end(item.base)
                self._items.move_to_end(key)
                self.stats.hits += 1
                return item.pipe, True
            t0 = time.perf_counter()
            loaded = self._loader(key)
            if not isinstance(loaded, Loaded):
                loaded = Loaded(loaded, pipeline_bytes(loaded))
            self.stats.loads += 1
            log.info("loaded %s (%.1f MB) in %.2fs", key, loaded.bytes / 1e6,
                     time.perf_counter() - t0)
            self._items[key] = loaded
            self._evict(keep={key, loaded.base})
            return loaded.pipe, False

    def _evict(self, keep: set) -> None:
        while len(self._items) > len(keep & set(self._items)) and (
            len(self._items) > self.max_models or self.bytes > self.max_bytes
        ):
            oldest = next(k for k in self._items if k not in keep)
            self._drop(oldest)

    def _drop(self, key: str) -> None:
        self._items.pop(key, None)
        self.stats.evictions += 1
        log.info("evicted %s from the pipeline cache", key)
        for other in [k for k, item in self._items.items() if item.base == key]:
            self._drop(other)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def discard(self, key: str) -> None:
        """Forget a model (removed from the registry) and its variants."""
        with self._lock:
            if key in self._items:
                self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
