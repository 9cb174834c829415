"""The whole service on loopback for a benchmark: Redis, one worker process, the API.

    with Stack() as stack:          # embedded Redis in a fresh LETHE_HOME
        httpx.post(f"{stack.url}/generate", ...)

Settings are environment variables, set here before anything reads them, so a benchmark
that uses a stack imports ``app``/``worker`` modules only inside it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any


class Stack:
    def __init__(self, redis_url: str | None = None, progress_interval_s: float = 0.25):
        self.home = Path(tempfile.mkdtemp(prefix="lethe-bench-"))
        self._redis_url = redis_url
        self._progress = progress_interval_s
        self._redis: Any = None
        self._worker: Any = None
        self._server: Any = None

    def __enter__(self) -> Stack:
        os.environ.update({"LETHE_HOME": str(self.home), "HF_HUB_OFFLINE": "1",
                           "LETHE_PROGRESS_INTERVAL_S": str(self._progress)})
        from app.config import get_settings
        from app.embedded import EmbeddedRedis

        if self._redis_url is None:
            self._redis = EmbeddedRedis(self.home / "redis", persist=False).start()
        os.environ["LETHE_REDIS_URL"] = self._redis_url or self._redis.url
        get_settings.cache_clear()
        from app.registry import open_registry
        from app.testing import LiveServer, start_worker
        from worker.defaults import ensure_default_models

        self.redis_url = os.environ["LETHE_REDIS_URL"]
        self.registry = open_registry(get_settings())
        ensure_default_models(self.registry)
        self._worker = start_worker("bench", log=self.home / "worker.log")
        self._server = LiveServer().__enter__()
        self.url = self._server.url
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        from app.testing import stop_worker

        if self._server:
            self._server.__exit__(kind, exc, tb)
        if self._worker:
            stop_worker(self._worker)
        if self._redis:
            self._redis.stop()
        shutil.rmtree(self.home, ignore_errors=True)

