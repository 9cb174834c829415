"""What ``lethe serve`` starts, kept running: worker processes and the embedded Redis.

A child that exits without being asked to (a crash, ``kill -9``, the OOM killer) is started
again; the embedded Redis reloads its append-only file, so queued jobs come back with it.
A child that keeps dying is a fault no restart mends: after ``max_restarts`` exits within
``window_s`` the supervisor gives up and ``lethe serve`` exits non-zero, saying which.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol


class Child(Protocol):
    name: str

    def alive(self) -> bool: ...

    def exit_code(self) -> int | None: ...

    def restart(self) -> None: ...


class WorkerProcess:
    """A ``lethe worker`` on one queue, under a fresh name each time it starts."""

    def __init__(self, queue: str, env: dict[str, str]):
        self.queue, self.env = queue, env
        self.name = f"worker[{queue}]"
        self.worker_name = ""
        self.process: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        self.worker_name = f"{self.queue}-{uuid.uuid4().hex[:12]}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--queues", self.queue,
             "--name", self.worker_name], env=self.env)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return self.process.poll() if self.process else None

    def restart(self) -> None:
        self.start()


class Supervisor(threading.Thread):
    def __init__(self, children: list[Child], on_give_up: Callable[[str], None],
                 max_restarts: int = 5, window_s: float = 60.0, interval_s: float = 0.5):
        super().__init__(daemon=True, name="supervisor")
        self.children, self.on_give_up = children, on_give_up
        self.max_restarts, self.window_s, self.interval_s = max_restarts, window_s, interval_s
        self.restarts: dict[str, list[float]] = {c.name: [] for c in children}
        self._stop_event = threading.Event()

    def stop(self) -> None:
        """Before the children are stopped on purpose: an exit is then no fault."""
        self._stop_event.set()
        if self.is_alive():
            self.join(5)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            for child in self.children:
                if child.alive() or self._stop_event.is_set():
                    continue
                now = time.monotonic()
                recent = [t for t in self.restarts[child.name] if now - t < self.window_s]
                if len(recent) >= self.max_restarts:
                    self.on_give_up(f"{child.name} exited {len(recent) + 1} times within "
                                    f"{self.window_s:.0f}s; giving up")
                    return
                self.restarts[child.name] = [*recent, now]
                print(f"lethe: {child.name} exited (code {child.exit_code()}); restarting it",
                      flush=True)
                try:
                    child.restart()
                except Exception as exc:  # counted as an exit: retried, then given up
                    print(f"lethe: restarting {child.name} failed: {exc}", flush=True)
