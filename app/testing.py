"""The service on loopback, for tests, benchmarks and examples: the real API served by
uvicorn in a thread, and real ``lethe worker`` processes.

The environment (LETHE_*) is the caller's; nothing happens on import.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from redis import Redis

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving the real app on a loopback port, in a thread. ``fresh``: an app
    built now, from the settings as they are now (the module's ``app`` was built on
    import)."""

    def __init__(self, fresh: bool = False) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config("app.main:create_app" if fresh else "app.main:app",
                                factory=fresh, host="127.0.0.1", port=self.port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_worker(name: str, queues: str = "images,train", log: Path | None = None
                 ) -> subprocess.Popen:
    """A real `lethe worker` process on the test Redis; returns once it beats."""
    from app import workers

    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--queues", queues, "--name", name],
        cwd=ROOT, env=dict(os.environ), stdout=out, stderr=subprocess.STDOUT,
    )
    redis = Redis.from_url(os.environ["LETHE_REDIS_URL"])
    deadline = time.monotonic() + 120
    while name not in workers.alive(redis):
        if proc.poll() is not None:
            raise RuntimeError(f"worker {name} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"worker {name} did not register")
        time.sleep(0.2)
    return proc


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
