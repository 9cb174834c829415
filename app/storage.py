"""Where shared files live: a local folder (the default) or S3-compatible object storage.

One small interface of keys ("registry/tiny-sd/manifest.json") and whole objects: the
registry publishes models through it (``app.objectregistry``) so that workers on other
hosts, without a shared disk, see the same models. ``LETHE_STORAGE_URL`` picks it:
unset, files stay under ``LETHE_HOME``; ``s3://bucket/prefix`` puts them in a bucket
(``LETHE_S3_ENDPOINT_URL`` for servers other than AWS; credentials from the standard
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_REGION``), through boto3, the
AWS SDK, rather than requests signed by code of ours.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from app.errors import InvalidParams, shown


class Storage(Protocol):
    url: str

    def read(self, key: str) -> bytes:
        """The object's bytes; ``FileNotFoundError`` if there is none."""

    def write(self, key: str, data: bytes) -> None:
        """Put the object whole: a reader sees the old one or the new one, never half."""

    def upload(self, key: str, path: Path) -> None: ...

    def download(self, key: str, dest: Path) -> None:
        """Copy the object to ``dest`` (written beside it and renamed into place)."""

    def keys(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix``, in key order."""

    def listing(self, prefix: str) -> Iterator[tuple[str, float]]:
        """Every key under ``prefix`` with when it was last written (Unix time)."""

    def folders(self, prefix: str) -> list[str]:
        """The names one level below ``prefix`` (``registry/`` → model ids)."""

    def delete(self, key: str) -> None: ...


class LocalStorage:
    """Keys as paths under a folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = self.root.resolve().as_uri()

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"not a storage key: {key!r}")
        return self.root / key

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def upload(self, key: str, path: Path) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def download(self, key: str, dest: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise FileNotFoundError(key)
        _place(dest, lambda tmp: shutil.copyfile(source, tmp))

    def keys(self, prefix: str) -> Iterator[str]:
        for key, _ in self.listing(prefix):
            yield key

    def listing(self, prefix: str) -> Iterator[tuple[str, float]]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.exists():
            return
        for path in sorted(base.rglob("*")):
            try:
                if path.is_file() and not path.name.startswith("."):
                    yield path.relative_to(self.root).as_posix(), path.stat().st_mtime
            except FileNotFoundError:  # removed while listed
                continue

    def folders(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/"))
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # As in a bucket, a prefix with no object left is no folder: prune empty parents.
        for parent in path.parents:
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:  # not empty (or gone)
                break


class S3Storage:
    """Keys as objects under ``prefix`` in ``bucket``."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 client: Any = None):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        # Path-style addressing: what S3-compatible servers on one host name understand.
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url,
            # Retries with back-off: a store answers 500/503 while it grows (SeaweedFS
            # allocating a new bucket's first volume) or under load.
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 8,
                                                                    "mode": "standard"}))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _missing(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        return code in ("NoSuchKey", "404", "NotFound")

    def read(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.ClientError as exc:
            if self._missing(exc):
                raise FileNotFoundError(key) from None
            raise

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def upload(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def ensure_bucket(self) -> None:
        """Make the bucket if there is none yet (a new deployment's first start)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self.client.exceptions.ClientError as exc:
            if not self._missing(exc) and "NoSuchBucket" not in str(exc):
                raise
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except self.client.exceptions.BucketAlreadyOwnedByYou:
                pass  # another host made it meanwhile

    def download(self, key: str, dest: Path) -> None:
        def fetch(tmp: Path) -> None:
            try:
                self.client.download_file(self.bucket, self._key(key), str(tmp))
            except self.client.exceptions.ClientError as exc:
                if self._missing(exc):
                    raise FileNotFoundError(key) from None
                raise

        _place(dest, fetch)

    def keys(self, prefix: str) -> Iterator[str]:
        for key, _ in self.listing(prefix):
            yield key

    def listing(self, prefix: str) -> Iterator[tuple[str, float]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix))
        cut = len(self.prefix) + 1 if self.prefix else 0
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"][cut:], item["LastModified"].timestamp()

    def folders(self, prefix: str) -> list[str]:
        full = self._key(prefix.rstrip("/") + "/")
        names = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full, Delimiter="/")
        for page in pages:
            for common in page.get("CommonPrefixes", []):
                # Servers backed by a file system (SeaweedFS) may list a prefix whose last
                # object was just deleted: a folder counts while it holds an object.
                held = self.client.list_objects_v2(Bucket=self.bucket,
                                                   Prefix=common["Prefix"], MaxKeys=1)
                if held.get("KeyCount", 0):
                    names.append(common["Prefix"][len(full):].rstrip("/"))
        return sorted(names)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def _place(dest: Path, fill: Any) -> None:
    """Fill a file beside ``dest``, then rename it into place: never half a file there."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        fill(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


_opened: dict[tuple[str, str | None], Storage] = {}


def open_storage(url: str, endpoint_url: str | None = None) -> Storage:
    """The storage ``url`` names: ``s3://bucket[/prefix]`` (its bucket made if missing;
    one client per process) or a folder (``file://`` or a path)."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise InvalidParams(f"`LETHE_STORAGE_URL` {shown(url)} names no bucket "
                                "(s3://bucket/prefix)")
        at = (url, endpoint_url or None)
        if at not in _opened:
            store = S3Storage(parts.netloc, parts.path, endpoint_url or None)
            store.ensure_bucket()
            _opened[at] = store
        return _opened[at]
    if parts.scheme in ("", "file"):
        return LocalStorage(Path(parts.path if parts.scheme else url))
    raise InvalidParams(f"`LETHE_STORAGE_URL` {shown(url)} is not s3://bucket/prefix or a "
                        "folder")
