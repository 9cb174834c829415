"""Service overhead and the pipeline cache, measured side by side in one run.

    python -m bench.service [--model shapes-sd] [--steps 20] [--repeats 5]

Starts an embedded Redis, one worker process and the API on loopback, then measures:
  * cold: the first request to a model (the worker loads it) and the load alone;
  * cached: later requests to the same model;
  * direct: the same pipeline call in this process, same parameters and seed.
Prints a table of medians and spreads; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from app.client import LetheClient


def run_job(lethe: LetheClient, body: dict, worker_run_s: list[float] | None = None) -> float:
    t0 = time.perf_counter()
    job = lethe.wait(lethe.generate(**body), timeout_s=600)
    assert job.status == "succeeded", job
    lethe.image(job, 0)
    if worker_run_s is not None:
        worker_run_s.append(job.result["timings"]["run_s"])
    return time.perf_counter() - t0


def summary(xs: list[float]) -> str:
    med = statistics.median(xs)
    lo, hi = min(xs) * 1000, max(xs) * 1000
    return f"{med * 1000:8.1f} ms  (min {lo:.1f}, max {hi:.1f}, n={len(xs)})"


def run(model: str = "shapes-sd", steps: int = 20, size: int | None = None,
        repeats: int = 5, redis_url: str | None = None) -> dict:
    """Cold, cached and direct timings (seconds) for one model, side by side."""
    import logging

    from bench.stack import Stack

    logging.getLogger("httpx").setLevel(logging.WARNING)
    with Stack(redis_url) as stack:
        import torch

        from worker.pipelines import Runtime, load_pipeline, with_scheduler

        manifest = stack.registry.get(model)
        defaults = manifest.get("defaults") or {}
        size = size or defaults.get("width", 512)
        body = {"prompt": "a red circle", "model": model, "steps": steps, "seed": 1,
                "width": size, "height": size, "scheduler": "ddim",
                "guidance_scale": defaults.get("guidance_scale", 7.5)}
        runtime = Runtime.resolve()
        loads = []
        for _ in range(3):
            t0 = time.perf_counter()
            pipe = load_pipeline(stack.registry.path(model), runtime)
            loads.append(time.perf_counter() - t0)

        def direct_call() -> float:
            t0 = time.perf_counter()
            p = with_scheduler(pipe, "ddim")
            with torch.inference_mode():
                image = p(prompt=[body["prompt"]], num_inference_steps=steps,
                          guidance_scale=body["guidance_scale"], width=size, height=size,
                          generator=[torch.Generator("cpu").manual_seed(1)]).images[0]
            image.save(stack.home / "direct.png")  # the service writes a PNG too
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        # Service and direct calls alternate, so drift in the machine's speed hits both.
        direct: list[float] = []
        inside: list[float] = []
        cached: list[float] = []
        with LetheClient(stack.url, timeout_s=600) as lethe:
            cold = run_job(lethe, body)
            direct_call()  # warm-up of this process's copy
            for _ in range(repeats):
                cached.append(run_job(lethe, body, inside))
                direct.append(direct_call())
        device = torch.cuda.get_device_name() if runtime.device.type == "cuda" else "cpu"
        return {"model": model, "size": size, "steps": steps, "device": device,
                "dtype": str(runtime.dtype), "cold": [cold], "load": loads,
                "cached": cached, "inside": inside, "direct": direct}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--redis-url", help="use this Redis instead of the embedded one")
    args = parser.parse_args()
    r = run(args.model, args.steps, args.size, args.repeats, args.redis_url)
    import torch

    d, c, cold = (statistics.median(r["direct"]), statistics.median(r["cached"]),
                  r["cold"][0])
    print(f"model {r['model']}, {r['size']}x{r['size']}, {r['steps']} DDIM steps, "
          f"{r['device']}, {r['dtype']}, torch {torch.__version__}, "
          f"python {sys.version.split()[0]}")
    print(f"first request (cold load)   {cold * 1000:8.1f} ms")
    print(f"load alone                  {summary(r['load'])}")
    print(f"later requests (cached)     {summary(r['cached'])}")
    print(f"  of which in the pipeline  {summary(r['inside'])}")
    print(f"direct pipeline call        {summary(r['direct'])}")
    print(f"service overhead            {(c - d) * 1000:8.1f} ms  ({(c / d - 1) * 100:+.1f}%)")
    print(f"cold / cached               {cold / c:8.2f}x")


if __name__ == "__main__":
    main()
