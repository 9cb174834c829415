"""Load: N generate requests from C concurrent clients against a running service.

    python -m bench.load [--model shapes-sd] [--requests 300] [--clients 16] [--steps 20]

Each client submits a job, polls it to the end, fetches its PNG and submits the next;
every job has its own seed. Reports throughput, latency percentiles, failed and lost jobs
(a lost job is one whose id the API gave but that never finished), and the images queue's
depth sampled every half second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

from app.client import ApiError, JobWaitTimeout, LetheClient


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def run(model: str = "shapes-sd", requests: int = 300, clients: int = 16, steps: int = 20,
        redis_url: str | None = None, job_timeout_s: float = 600) -> dict:
    from bench.stack import Stack

    with Stack(redis_url) as stack:
        from rq import Queue

        from app.queue import IMAGES, connect

        queue = Queue(IMAGES, connection=connect(stack.redis_url))
        lock = threading.Lock()
        next_index = [0]
        latencies: list[float] = []
        outcomes: dict[str, int] = {}
        depth: list[tuple[float, int]] = []
        done = threading.Event()

        def client() -> None:
            with LetheClient(stack.url, timeout_s=60) as lethe:
                while True:
                    with lock:
                        i = next_index[0]
                        next_index[0] += 1
                    if i >= requests:
                        return
                    t0 = time.perf_counter()
                    outcome = one_job(lethe, {"prompt": "a red circle", "model": model,
                                              "steps": steps, "seed": i}, job_timeout_s)
                    with lock:
                        outcomes[outcome] = outcomes.get(outcome, 0) + 1
                        if outcome == "succeeded":
                            latencies.append(time.perf_counter() - t0)

        def sample_depth(t_start: float) -> None:
            while not done.wait(0.5):
                depth.append((round(time.perf_counter() - t_start, 1), queue.count))

        t_start = time.perf_counter()
        sampler = threading.Thread(target=sample_depth, args=(t_start,), daemon=True)
        sampler.start()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
        done.set()
        sampler.join()
    ok = outcomes.get("succeeded", 0)
    return {"model": model, "requests": requests, "clients": clients, "steps": steps,
            "wall_s": wall, "throughput_per_s": ok / wall, "outcomes": outcomes,
            "failed": requests - ok, "latency_s": latencies,
            "p50_s": percentile(latencies, 50) if latencies else None,
            "p95_s": percentile(latencies, 95) if latencies else None,
            "queue_depth": depth, "max_queue_depth": max((d for _, d in depth), default=0)}


def one_job(lethe: LetheClient, body: dict, timeout_s: float) -> str:
    """submitted → finished → PNG fetched; the outcome's name."""
    try:
        job_id = lethe.generate(**body)
    except ApiError as refused:
        return f"http_{refused.status}"
    try:
        job = lethe.wait(job_id, timeout_s=timeout_s)
    except JobWaitTimeout:
        return "lost"
    if job.status != "succeeded":
        return job.status
    try:
        lethe.image(job_id, 0)
    except ApiError:
        return "image_missing"
    return "succeeded"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    r = run(args.model, args.requests, args.clients, args.steps)
    r["latency_s"] = {"median": statistics.median(r["latency_s"]) if r["latency_s"] else None}
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
