"""Many clients waiting on a running job: does the rest of the service still answer, and
what does each waiting client cost Redis?

    python -m bench.waiters [--clients 48] [--seconds 20]

Generate jobs of 500 steps run one after another; half the clients long-poll the running
one (``GET /jobs/{id}?wait=30``, again and again), half hold its event stream (``GET
/jobs/{id}/events``; a service without one long-polls instead). Meanwhile ``/healthz``
and ``/models`` are timed every 0.1 s. Redis' ``total_commands_processed`` is read over
the same window with and without the waiters, jobs running both times: the difference per
client is what one waiting client costs. Uses only HTTP and Redis' INFO, so it measures
an older checkout as well.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx


def _commands(redis) -> int:
    return int(redis.info("stats")["total_commands_processed"])


def run(model: str = "shapes-sd", clients: int = 48, seconds: float = 20.0) -> dict:
    from bench.stack import Stack

    with Stack() as stack:
        from redis import Redis

        redis = Redis.from_url(stack.redis_url)
        stop, current = threading.Event(), [""]

        def drive() -> None:
            """Generate jobs one after another, for as long as the benchmark runs."""
            with httpx.Client(base_url=stack.url, timeout=60) as http:
                while not stop.is_set():
                    r = http.post("/generate", json={"prompt": "a red circle", "model": model,
                                                     "steps": 500, "width": 32, "height": 32})
                    current[0] = r.json()["id"]
                    while http.get(f"/jobs/{current[0]}").json()["status"] in (
                            "queued", "running") and not stop.is_set():
                        time.sleep(0.5)

        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        while not current[0]:
            time.sleep(0.05)

        def window() -> float:
            before, t0 = _commands(redis), time.monotonic()
            time.sleep(seconds)
            return (_commands(redis) - before) / (time.monotonic() - t0)

        alone = window()  # the jobs and their worker, nobody waiting
        has_events = httpx.get(f"{stack.url}/openapi.json").json()["paths"].get(
            "/jobs/{job_id}/events") is not None
        streams = [0]

        def poller() -> None:
            with httpx.Client(base_url=stack.url, timeout=60) as http:
                while not stop.is_set():
                    http.get(f"/jobs/{current[0]}", params={"wait": 30})

        def listener() -> None:
            streams[0] += 1
            with httpx.Client(base_url=stack.url, timeout=httpx.Timeout(10, read=None)) as h:
                while not stop.is_set():
                    with h.stream("GET", f"/jobs/{current[0]}/events") as r:
                        for _ in r.iter_lines():
                            if stop.is_set():
                                return

        threads = [threading.Thread(target=listener if has_events and i % 2 else poller,
                                    daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        time.sleep(2)  # every client connected and waiting
        timings: dict[str, list[float]] = {"/healthz": [], "/models": []}

        def probe() -> None:
            with httpx.Client(base_url=stack.url, timeout=30) as http:
                while not stop.is_set():
                    for path, xs in timings.items():
                        t0 = time.perf_counter()
                        http.get(path).raise_for_status()
                        xs.append(time.perf_counter() - t0)
                    time.sleep(0.1)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        waiting = window()
        stop.set()
        httpx.delete(f"{stack.url}/jobs/{current[0]}")
        prober.join(timeout=30)
        driver.join(timeout=30)
        return {
            "model": model, "clients": clients, "seconds": seconds,
            "event_streams": streams[0], "long_polls": clients - streams[0],
            "commands_per_s_alone": round(alone, 1),
            "commands_per_s_waiting": round(waiting, 1),
            "per_client_per_s": round((waiting - alone) / clients, 2),
            "healthz_s": timings["/healthz"], "models_s": timings["/models"],
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    r = run(args.model, args.clients, args.seconds)
    for path in ("healthz_s", "models_s"):
        xs = r.pop(path)
        r[path.replace("_s", "")] = {"median_ms": round(statistics.median(xs) * 1000, 1),
                                     "max_ms": round(max(xs) * 1000, 1), "n": len(xs)}
    print(json.dumps(r))


if __name__ == "__main__":
    main()
