"""Micro-batching: images per second at C concurrent clients, one job at a time vs batched.

    python -m bench.batching [--model shapes-sd] [--clients 8] [--rounds 6] [--steps 20]

Two runs of the whole service, one after the other, differing only in
LETHE_BATCH_MAX_IMAGES (1, then 8): C clients each submit ``rounds`` generate jobs one
after another (every job its own seed) and wait for each. Each image is then compared with
the same seed's image from the other run: a client must get its own image either way.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import threading
import time

import numpy as np
from PIL import Image

from app.client import JobRef, LetheClient
from app.schemas import JobPublic


def one_run(model: str, clients: int, rounds: int, steps: int, max_images: int) -> dict:
    os.environ["LETHE_BATCH_MAX_IMAGES"] = str(max_images)
    from bench.stack import Stack

    latencies: list[float] = []
    images: dict[int, np.ndarray] = {}
    batched = []
    lock = threading.Lock()
    with Stack() as stack:
        with LetheClient(stack.url, timeout_s=600) as lethe:  # load the model once
            succeeded(lethe, lethe.generate(prompt="a", model=model, steps=1))

        def client(c: int) -> None:
            with LetheClient(stack.url, timeout_s=600) as lethe:
                for r in range(rounds):
                    seed = 1000 + c * rounds + r
                    t0 = time.perf_counter()
                    job = succeeded(lethe, lethe.generate(
                        prompt=f"a {['red', 'blue'][c % 2]} circle", model=model,
                        steps=steps, seed=seed))
                    png = lethe.image(job, 0)
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        images[seed] = np.asarray(Image.open(io.BytesIO(png))).astype(int)
                        batched.append(job.result.get("batch", {}).get("jobs", 1) > 1)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    return {"images_per_s": len(images) / wall, "wall_s": wall, "latency_s": latencies,
            "jobs": len(batched), "batched_jobs": sum(batched), "max_batch": max_images,
            "images": images}


def succeeded(lethe: LetheClient, job_id: JobRef) -> JobPublic:
    job = lethe.wait(job_id, timeout_s=600)
    if job.status != "succeeded":
        raise RuntimeError(f"job {job_id} did not succeed: {job}")
    return job


def run(model: str = "shapes-sd", clients: int = 8, rounds: int = 6, steps: int = 20,
        max_batch: int = 8) -> dict:
    single = one_run(model, clients, rounds, steps, 1)
    batched = one_run(model, clients, rounds, steps, max_batch)
    # Same seed, same image: batching may change the arithmetic's order, never the picture.
    diffs = [np.abs(single["images"][s] - batched["images"][s]).max() for s in single["images"]]
    own = bool(max(diffs) <= 2)
    for r in (single, batched):
        r["own_images"] = f"yes (largest pixel difference {max(diffs)})" if own else \
            f"NO (largest pixel difference {max(diffs)})"
        del r["images"]
    return {"model": model, "clients": clients, "rounds": rounds, "steps": steps,
            "single": single, "batched": batched}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    r = run(args.model, args.clients, args.rounds, args.steps)
    for k in ("single", "batched"):
        r[k]["latency_s"] = sorted(r[k]["latency_s"])[len(r[k]["latency_s"]) // 2]
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
