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
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from app.config import Settings
    from worker.context import WorkerContext
    from worker.defaults import ensure_default_models
    from worker.esd import ESDConfig, ESDTrainer
    from worker.pipelines import PipelineCache
    from worker.variants import save_delta

    home = Path(tempfile.mkdtemp(prefix="lethe-bench-"))
    ctx = WorkerContext.from_settings(Settings(home=home))
    ensure_default_models(ctx.registry)
    base, _ = ctx.cache.get(args.model)
    trainer = ESDTrainer(base, ESDConfig(concepts=("triangle",), iterations=2, ddim_steps=4,
                                         learning_rate=1e-3, height=32, width=32))
    trainer.train()
    delta = trainer.delta()
    digest = ctx.registry.get(args.model)["digest"]
    with ctx.registry.create("bench-variant", {
            "kind": "text-to-image", "format": "delta",
            "base": {"id": args.model, "digest": digest}}) as staging:
        save_delta(delta, staging)
    delta_bytes = sum(t.numel() * t.element_size() for t in delta.values())

    cold, variant = [], []
    for _ in range(args.repeats):
        ctx.cache.clear()
        t0 = time.perf_counter()
        ctx.cache.get(args.model)
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ctx.cache.get("bench-variant")
        variant.append(time.perf_counter() - t0)
    cache: PipelineCache = ctx.cache
    # What the variant really adds: bytes of tensors it holds that the base does not share.
    base_pipe, variant_pipe = cache.get(args.model)[0], cache.get("bench-variant")[0]

    def tensors(pipe) -> dict[int, int]:
        out = {}
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                for t in [*module.parameters(), *module.buffers()]:
                    out[t.data_ptr()] = t.numel() * t.element_size()
        return out

    base_ptrs = tensors(base_pipe)
    added = sum(n for ptr, n in tensors(variant_pipe).items() if ptr not in base_ptrs)

    def ms(xs: list[float]) -> str:
        return (f"{statistics.median(xs) * 1000:.1f} ms ({min(xs) * 1000:.1f}–"
                f"{max(xs) * 1000:.1f}, n={len(xs)})")

    print(f"device {ctx.runtime.device}, dtype {ctx.runtime.dtype}, model {args.model}")
    print(f"cold load of the base            {ms(cold)}")
    print(f"variant first request, base cached {ms(variant)}")
    ratio = statistics.median(variant) / statistics.median(cold)
    print(f"variant / cold                   {ratio:.3f}")
    print(f"delta {delta_bytes / 1e6:.2f} MB ({len(delta)} tensors); cache charges the variant "
          f"{cache.size_of('bench-variant') / 1e6:.2f} MB "
          f"({cache.size_of('bench-variant') / delta_bytes:.2f}×); tensors the variant holds "
          f"that the base does not: {added / 1e6:.2f} MB ({added / delta_bytes:.2f}× the "
          f"delta); base {cache.size_of(args.model) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
