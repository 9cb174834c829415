"""Service overhead and the pipeline cache, measured side by side in one run.

    python -m bench.service [--model tiny-sd] [--steps 20] [--repeats 5]

Starts an embedded Redis, one worker process and the API on loopback, then measures:
  * cold: the first request to a model (the worker loads it) and the load alone;
  * cached: later requests to the same model;
  * direct: the same pipeline call in this process, same parameters and seed.
Prints a table of medians and spreads; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx


def run_job(http: httpx.Client, body: dict, worker_run_s: list[float] | None = None) -> float:
    t0 = time.perf_counter()
    job_id = http.post("/generate", json=body).json()["id"]
    while True:
        job = http.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            break
        time.sleep(float(os.environ.get("BENCH_POLL_S", "0.02")))
    assert job["status"] == "succeeded", job
    http.get(job["result"]["images"][0]["url"]).raise_for_status()
    if worker_run_s is not None:
        worker_run_s.append(job["result"]["timings"]["run_s"])
    return time.perf_counter() - t0


def summary(xs: list[float]) -> str:
    med = statistics.median(xs)
    lo, hi = min(xs) * 1000, max(xs) * 1000
    return f"{med * 1000:8.1f} ms  (min {lo:.1f}, max {hi:.1f}, n={len(xs)})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--redis-url", help="use this Redis instead of the embedded one")
    args = parser.parse_args()

    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    home = Path(tempfile.mkdtemp(prefix="lethe-bench-"))
    os.environ.update({"LETHE_HOME": str(home), "HF_HUB_OFFLINE": "1",
                       "LETHE_PROGRESS_INTERVAL_S": "0.25"})
    from app.embedded import EmbeddedRedis

    redis = None if args.redis_url else EmbeddedRedis(home / "redis", persist=False).start()
    os.environ["LETHE_REDIS_URL"] = args.redis_url or redis.url
    from app.config import get_settings
    from app.registry import Registry
    from tests.support import LiveServer, start_worker, stop_worker
    from worker.defaults import ensure_default_models
    from worker.pipelines import Runtime, load_pipeline, with_scheduler

    registry = Registry(get_settings().registry_dir)
    ensure_default_models(registry)
    manifest = registry.get(args.model)
    defaults = manifest.get("defaults") or {}
    size = args.size or defaults.get("width", 512)
    body = {"prompt": "a red circle", "model": args.model, "steps": args.steps, "seed": 1,
            "width": size, "height": size, "scheduler": "ddim",
            "guidance_scale": defaults.get("guidance_scale", 7.5)}

    import torch

    runtime = Runtime.resolve()
    loads = []
    for _ in range(3):
        t0 = time.perf_counter()
        pipe = load_pipeline(registry.path(args.model), runtime)
        loads.append(time.perf_counter() - t0)

    def direct_call() -> float:
        t0 = time.perf_counter()
        p = with_scheduler(pipe, "ddim")
        with torch.inference_mode():
            image = p(prompt=[body["prompt"]], num_inference_steps=args.steps,
                      guidance_scale=body["guidance_scale"], width=size, height=size,
                      generator=[torch.Generator("cpu").manual_seed(1)]).images[0]
        image.save(home / "direct.png")
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    # Service and direct calls alternate, so drift in the machine's speed hits both alike.
    worker = start_worker("bench")
    direct: list[float] = []
    inside: list[float] = []
    cached: list[float] = []
    try:
        with LiveServer() as server, httpx.Client(base_url=server.url, timeout=600) as http:
            cold = run_job(http, body)
            direct_call()  # warm-up of this process's copy
            for _ in range(args.repeats):
                cached.append(run_job(http, body, inside))
                direct.append(direct_call())
    finally:
        stop_worker(worker)
        if redis:
            redis.stop()

    d, c = statistics.median(direct), statistics.median(cached)
    device = torch.cuda.get_device_name() if runtime.device.type == "cuda" else "cpu"
    print(f"model {args.model}, {size}x{size}, {args.steps} DDIM steps, {device}, "
          f"{runtime.dtype}, torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"first request (cold load)   {cold * 1000:8.1f} ms")
    print(f"load alone                  {summary(loads)}")
    print(f"later requests (cached)     {summary(cached)}")
    print(f"  of which in the pipeline  {summary(inside)}")
    print(f"direct pipeline call        {summary(direct)}")
    print(f"service overhead            {(c - d) * 1000:8.1f} ms  ({(c / d - 1) * 100:+.1f}%)")
    print(f"cold / cached               {cold / c:8.2f}x")


if __name__ == "__main__":
    main()
