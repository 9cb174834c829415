"""``lethe serve``: the whole service on one machine.

With no ``LETHE_REDIS_URL`` it starts the embedded Redis; then one worker process per queue
(so a long erase never blocks generation) and the API in this process. ``--no-workers``
runs the API alone, for deployments whose workers run elsewhere. Ctrl-C (or SIGTERM)
stops the API, then the workers, then Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from app.config import Settings, get_settings
from app.embedded import EmbeddedRedis


def _start_workers(queues: list[str], env: dict[str, str]) -> list[subprocess.Popen]:
    return [
        subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--queues", q], env=env)
        for q in queues
    ]


def _wait_for_worker(url: str, procs: list[subprocess.Popen], timeout_s: float) -> None:
    from rq import Worker

    from app.queue import connect

    redis = connect(url)
    deadline = time.monotonic() + timeout_s
    print("lethe: waiting for the workers to load and register...", flush=True)
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("lethe: a worker exited during start-up; see its log above")
        if len(Worker.all(connection=redis)) >= len(procs):
            return
        time.sleep(0.5)
    raise SystemExit(f"lethe: no worker registered within {timeout_s:.0f}s")


def _stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # RQ: finish or abandon the current job, then exit
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(host: str, port: int, workers: bool = True, settings: Settings | None = None
          ) -> None:
    import uvicorn

    settings = settings or get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    embedded = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings.home / "redis").start()
        os.environ["LETHE_REDIS_URL"] = embedded.url
        print(f"lethe: embedded redis at {embedded.url}", flush=True)
    os.environ["LETHE_HOME"] = str(settings.home.resolve())
    get_settings.cache_clear()
    settings = get_settings()
    procs: list[subprocess.Popen] = []
    # SIGTERM behaves like Ctrl-C so `docker stop` and `kill` shut down cleanly too.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if workers:
            procs = _start_workers(settings.queue_names, dict(os.environ))
            _wait_for_worker(settings.redis_url or "", procs, timeout_s=300)
        print(f"lethe: serving on http://{host}:{port} (docs at /docs)", flush=True)
        uvicorn.run("app.main:app", host=host, port=port, log_level="info")
    except KeyboardInterrupt:
        pass
    finally:
        if procs:
            print("lethe: stopping workers...", flush=True)
            _stop(procs)
        if embedded:
            embedded.stop()
        print("lethe: stopped", flush=True)
