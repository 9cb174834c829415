"""An edited variant's first request with its base cached, against a cold load of the base.

    python -m bench.variant [--model shapes-sd] [--repeats 5]

In one process, as a worker does: train a short ESD edit of ``--model`` (its delta is what
an erase job stores), then, ``--repeats`` times on a fresh cache, time
  * cold: the base model loaded from the registry folder;
  * variant: the edited model built from the cached base (delta read from disk included);
and report the memory the cached variant adds against its delta's size. Writes nothing.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(model: str = "shapes-sd", repeats: int = 5) -> dict:
    """Cold loads and variant first requests (seconds), and the memory a variant adds."""
    import torch

    from app.config import Settings
    from worker.context import WorkerContext
    from worker.defaults import ensure_default_models
    from worker.esd import ESDConfig, ESDTrainer
    from worker.pipelines import PipelineCache
    from worker.variants import save_delta

    home = Path(tempfile.mkdtemp(prefix="lethe-bench-"))
    atexit.register(shutil.rmtree, home, True)
    ctx = WorkerContext.from_settings(Settings(home=home))
    ensure_default_models(ctx.registry)
    base, _ = ctx.cache.get(model)
    trainer = ESDTrainer(base, ESDConfig(concepts=("triangle",), iterations=2, ddim_steps=4,
                                         learning_rate=1e-3, height=32, width=32))
    trainer.train()
    delta = trainer.delta()
    digest = ctx.registry.get(model)["digest"]
    with ctx.registry.create("bench-variant", {
            "kind": "text-to-image", "format": "delta",
            "base": {"id": model, "digest": digest}}) as staging:
        save_delta(delta, staging)
    delta_bytes = sum(t.numel() * t.element_size() for t in delta.values())

    cold, variant = [], []
    for _ in range(repeats):
        ctx.cache.clear()
        t0 = time.perf_counter()
        ctx.cache.get(model)
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ctx.cache.get("bench-variant")
        variant.append(time.perf_counter() - t0)
    cache: PipelineCache = ctx.cache
    # What the variant really adds: bytes of tensors it holds that the base does not share.
    base_pipe, variant_pipe = cache.get(model)[0], cache.get("bench-variant")[0]

    def tensors(pipe) -> dict[int, int]:
        out = {}
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                for t in [*module.parameters(), *module.buffers()]:
                    out[t.data_ptr()] = t.numel() * t.element_size()
        return out

    base_ptrs = tensors(base_pipe)
    added = sum(n for ptr, n in tensors(variant_pipe).items() if ptr not in base_ptrs)

    return {"model": model, "device": str(ctx.runtime.device), "dtype": str(ctx.runtime.dtype),
            "cold": cold, "variant": variant, "delta_bytes": delta_bytes,
            "delta_tensors": len(delta), "charged_bytes": cache.size_of("bench-variant"),
            "added_bytes": added, "base_bytes": cache.size_of(model)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    r = run(args.model, args.repeats)
    cold, variant, delta_bytes = r["cold"], r["variant"], r["delta_bytes"]

    def ms(xs: list[float]) -> str:
        return (f"{statistics.median(xs) * 1000:.1f} ms ({min(xs) * 1000:.1f}–"
                f"{max(xs) * 1000:.1f}, n={len(xs)})")

    print(f"device {r['device']}, dtype {r['dtype']}, model {r['model']}")
    print(f"cold load of the base            {ms(cold)}")
    print(f"variant first request, base cached {ms(variant)}")
    ratio = statistics.median(variant) / statistics.median(cold)
    print(f"variant / cold                   {ratio:.3f}")
    print(f"delta {delta_bytes / 1e6:.2f} MB ({r['delta_tensors']} tensors); cache charges "
          f"the variant {r['charged_bytes'] / 1e6:.2f} MB "
          f"({r['charged_bytes'] / delta_bytes:.2f}×); tensors the variant holds that the "
          f"base does not: {r['added_bytes'] / 1e6:.2f} MB "
          f"({r['added_bytes'] / delta_bytes:.2f}× the delta); base "
          f"{r['base_bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
