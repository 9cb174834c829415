"""Peak memory of a 256×256 → 1024×1024 upscale, tiled against in one piece.

    python -m bench.upscale_memory [--model shapes-x4] [--side 256] [--tiles 64 128 256]

Each setting runs in a fresh process (peak RSS only grows, so runs must not share one):
the process loads the upscaler, notes its resident memory, upscales one ``--side`` image
with ``LETHE_UPSCALE_TILE`` = tile (a tile as large as the image means no tiling), and
reports the peak resident memory the upscale added. On CUDA it reports
``torch.cuda.max_memory_allocated`` instead. Writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def child(model: str, side: int, tile: int, steps: int) -> dict:
    import resource
    import tempfile
    import time

    import numpy as np
    import torch
    from PIL import Image

    from app.config import Settings
    from worker.context import WorkerContext
    from worker.defaults import ensure_default_models
    from worker.upscale import UpscaleParams, plan, upscale

    ctx = WorkerContext.from_settings(Settings(home=tempfile.mkdtemp(prefix="lethe-bench-")))
    ensure_default_models(ctx.registry)
    pipe, _ = ctx.cache.get(model)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
    cuda = ctx.runtime.device.type == "cuda"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = upscale(pipe, image, UpscaleParams(steps=steps, tile=tile, overlap=16))
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    return {"tile": tile, "tiles": len(plan(side, side, tile, 16)), "out": out.size,
            "peak_added_mb": round(peak / 1e6, 1), "seconds": round(seconds, 1),
            "device": str(ctx.runtime.device)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-x4")
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tiles", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.side, args.child, args.steps)))
        return
    for tile in args.tiles:
        out = subprocess.run([sys.executable, "-m", "bench.upscale_memory", "--model",
                              args.model, "--side", str(args.side), "--steps", str(args.steps),
                              "--child", str(tile)], capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
