"""``lethe serve``: the whole service on one machine.

With no ``LETHE_REDIS_URL`` it starts the embedded Redis; then one worker process per queue
(so a long erase never blocks generation) and the API in this process. ``--no-workers``
runs the API alone, for deployments whose workers run elsewhere. What it started it keeps
running (``app.supervisor``): a worker or the embedded Redis that dies is restarted, and
one that keeps dying makes ``lethe serve`` exit with status 1. Ctrl-C (or SIGTERM) stops
the API, then the workers, then Redis.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import signal
import subprocess
import time

from app.config import Settings, get_settings
from app.embedded import EmbeddedRedis
from app.supervisor import Child, Supervisor, WorkerProcess


def _wait_for_workers(url: str, procs: list[WorkerProcess], timeout_s: float) -> None:
    from app import workers
    from app.queue import connect

    redis = connect(url)
    deadline = time.monotonic() + timeout_s
    print("lethe: waiting for the workers to load and register...", flush=True)
    while time.monotonic() < deadline:
        if not all(p.alive() for p in procs):
            raise SystemExit("lethe: a worker exited during start-up; see its log above")
        if {p.worker_name for p in procs} <= set(workers.alive(redis)):
            return
        time.sleep(0.5)
    raise SystemExit(f"lethe: no worker registered within {timeout_s:.0f}s")


def _stop(procs: list[WorkerProcess], grace_s: float = 10.0) -> None:
    running = [p.process for p in procs if p.process is not None and p.alive()]
    for proc in running:
        proc.send_signal(signal.SIGTERM)  # RQ: finish or abandon the current job, then exit
    deadline = time.monotonic() + grace_s
    for proc in running:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def check_exposure(host: str, settings: Settings) -> None:
    """Refuse to listen beyond loopback with no keys: with none, every caller is an admin
    (uploads, deletes, jobs). ``LETHE_ALLOW_OPEN`` (``--allow-open``) says it is meant."""
    if _loopback(host) or settings.keys or settings.allow_open:
        return
    raise SystemExit(
        f"lethe: refusing to serve on {host} with no LETHE_API_KEYS (every caller would be an "
        "admin): set LETHE_API_KEYS, e.g. LETHE_API_KEYS=ops:$(openssl rand -hex 16):admin, "
        "or pass --allow-open (LETHE_ALLOW_OPEN=1) if it is meant to be open")


# The modules of the ``worker`` extra (pyproject.toml; tests/app/test_serve.py keeps the
# two equal), by the name they are imported as.
WORKER_MODULES = ("torch", "diffusers", "transformers", "safetensors", "PIL", "numpy",
                  "accelerate", "peft")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module blocked in sys.modules
        return False


def check_worker_extra() -> None:
    """Refuse to start workers that would die on their first import: ``pip install
    lethe`` installs the API side only."""
    missing = [m for m in WORKER_MODULES if not _importable(m)]
    if missing:
        raise SystemExit(
            f"lethe: the workers need the worker extra ({', '.join(missing)} not "
            "installed): pip install 'lethe[worker]' (or make serve), or run the API alone "
            "with --no-workers and workers elsewhere")


def serve(host: str, port: int, workers: bool = True, settings: Settings | None = None
          ) -> None:
    import uvicorn

    settings = settings or get_settings()
    check_exposure(host, settings)
    if workers:
        check_worker_extra()
    settings.home.mkdir(parents=True, exist_ok=True)
    embedded = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings.home / "redis").start()
        os.environ["LETHE_REDIS_URL"] = embedded.url
        print(f"lethe: embedded redis at {embedded.url}", flush=True)
    os.environ["LETHE_HOME"] = str(settings.home.resolve())
    get_settings.cache_clear()
    settings = get_settings()
    procs: list[WorkerProcess] = []
    server = uvicorn.Server(uvicorn.Config("app.main:app", host=host, port=port,
                                           log_level="info", server_header=False,
                                           # uvicorn's lines go to the root logger,
                                           # formatted as the app's (app.logs)
                                           log_config=None))
    failure: list[str] = []

    def give_up(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    children: list[Child] = [embedded] if embedded else []
    supervisor = None
    # SIGTERM behaves like Ctrl-C so `docker stop` and `kill` shut down cleanly too.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if workers:
            procs = [WorkerProcess(q, dict(os.environ)).start() for q in settings.queue_names]
            _wait_for_workers(settings.redis_url or "", procs, timeout_s=300)
        supervisor = Supervisor([*children, *procs], give_up)
        supervisor.start()
        print(f"lethe: serving on http://{host}:{port} (docs at /docs)", flush=True)
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        if supervisor:
            supervisor.stop()
        if procs:
            print("lethe: stopping workers...", flush=True)
            _stop(procs)
        if embedded:
            embedded.stop()
        print("lethe: stopped", flush=True)
    if failure:
        raise SystemExit(f"lethe: {failure[0]}")
