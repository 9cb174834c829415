"""The model registry on shared storage, with a local cache per host.

The registry's layout is the same as on a folder — ``registry/<id>/manifest.json`` beside
the model's files — but the objects live in a ``Storage`` (S3, in the multi-host case), and
each host keeps what it uses in ``$LETHE_HOME/cache``:

- ``blobs/<sha256>``: every file once, named by the digest the manifest gives it. A blob is
  checked against that digest when it is fetched and again whenever its size or
  modification time is not what was checked last; a partial or damaged one is fetched
  again. The blobs are bounded by ``LETHE_STORAGE_CACHE_BYTES``, least recently used first.
- ``registry/<id>/``: the model as a folder of hard links to its blobs, what diffusers
  loads (``path``).

Publishing is files first, the manifest last: a reader lists models by their manifests, so
a model whose upload was cut short is never listed; what it left is garbage for a reaper,
never a broken model.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.errors import InvalidParams, ModelExists, ModelNotFound
from app.registry import (
    DOMAINS_FILE,
    EXPORTS_DIR,
    KINDS,
    MANIFEST,
    Registry,
    file_digest,
    full_manifest,
    validate_model_id,
)
from app.storage import Storage

PREFIX = "registry"
_STAMP = ".checked"  # beside each blob: the size and mtime its digest was checked at


class ObjectRegistry(Registry):
    def __init__(self, store: Storage, cache_dir: Path, max_cache_bytes: int = 50 * 1024**3):
        super().__init__(Path(cache_dir) / "registry")
        self.store, self.blobs = store, Path(cache_dir) / "blobs"
        self.max_cache_bytes = max_cache_bytes

    # Reading: manifests come from the store.
    def _manifest_key(self, model_id: str) -> str:
        return f"{PREFIX}/{model_id}/{MANIFEST}"

    def exists(self, model_id: str) -> bool:
        try:
            self._manifest(model_id)
        except (ModelNotFound, InvalidParams):
            return False
        return True

    def _manifest(self, model_id: str) -> dict[str, Any]:
        validate_model_id(model_id)
        try:
            return json.loads(self.store.read(self._manifest_key(model_id)))
        except FileNotFoundError:
            raise ModelNotFound(f"`model` {model_id!r} is not in the registry") from None

    def _manifests(self) -> list[dict[str, Any]]:
        out = []
        for name in self.store.folders(PREFIX):
            if name.startswith("."):
                continue
            try:
                out.append(self._manifest(name))
            except (ModelNotFound, InvalidParams):
                continue  # files without a manifest: an upload cut short, never a model
        return out

    # The local copy diffusers loads.
    def local_folder(self, model_id: str) -> Path | None:
        return None  # the API reads no model's weights out of the bucket for a check

    def path(self, model_id: str) -> Path:
        """The model as a local folder, its files fetched into the cache as needed."""
        manifest = self.get(model_id)
        folder = self.root / validate_model_id(model_id)
        files: dict[str, str] = manifest.get("files", {})
        with self._host_lock():
            for rel, digest in files.items():
                self._blob(f"{PREFIX}/{model_id}/{rel}", digest)
            if not self._linked(folder, manifest):
                staging = self.root / ".staging" / f"{model_id}-{uuid.uuid4().hex[:8]}"
                for rel, digest in files.items():
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.link(self.blobs / digest, staging / rel)
                (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
                old = folder.with_name(f".{model_id}.old-{uuid.uuid4().hex[:8]}")
                if folder.exists():
                    os.replace(folder, old)
                os.replace(staging, folder)
                shutil.rmtree(old, ignore_errors=True)
            self._bound(keep=set(files.values()))
        return folder

    def _linked(self, folder: Path, manifest: dict[str, Any]) -> bool:
        """Whether ``folder`` is this manifest's files, each the very blob it names."""
        try:
            if json.loads((folder / MANIFEST).read_text()).get("digest") != manifest["digest"]:
                return False
            return all(os.path.samefile(folder / rel, self.blobs / digest)
                       for rel, digest in manifest.get("files", {}).items())
        except (OSError, ValueError):
            return False

    def _blob(self, key: str, digest: str) -> Path:
        """The cached file of ``digest``, fetched from ``key`` unless a checked copy is
        there already."""
        blob = self.blobs / digest
        if self._checked(blob, digest):
            os.utime(blob)  # recently used: the last to be evicted
            return blob
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.store.download(key, blob)
        got = file_digest(blob)
        if got != digest:
            blob.unlink(missing_ok=True)
            raise OSError(f"{key}: the stored file's sha256 is {got[:12]}..., its manifest "
                          f"says {digest[:12]}...; the registry copy is damaged")
        self._stamp(blob)
        return blob

    def _checked(self, blob: Path, digest: str) -> bool:
        """A cached blob is trusted while its size and mtime are those it was checked at;
        otherwise it is hashed again (and dropped if it does not match)."""
        try:
            stat = blob.stat()
        except FileNotFoundError:
            return False
        stamp = blob.with_name(blob.name + _STAMP)
        if stamp.is_file() and stamp.read_text() == f"{stat.st_size} {stat.st_mtime_ns}":
            return True
        if file_digest(blob) == digest:
            self._stamp(blob)
            return True
        blob.unlink(missing_ok=True)  # partial or damaged: fetched again
        return False

    def _stamp(self, blob: Path) -> None:
        stat = blob.stat()
        blob.with_name(blob.name + _STAMP).write_text(f"{stat.st_size} {stat.st_mtime_ns}")

    def _bound(self, keep: set[str]) -> None:
        """Evict the least recently used blobs past ``max_cache_bytes`` (never ``keep``:
        the model just asked for). A folder linking an evicted blob keeps its own link."""
        if not self.blobs.is_dir():
            return
        blobs = [p for p in self.blobs.iterdir() if not p.name.endswith(_STAMP)
                 and not p.name.startswith(".")]
        total = sum(p.stat().st_size for p in blobs)
        for blob in sorted(blobs, key=lambda p: p.stat().st_mtime):
            if total <= self.max_cache_bytes:
                break
            if blob.name in keep:
                continue
            total -= blob.stat().st_size
            blob.unlink(missing_ok=True)
            blob.with_name(blob.name + _STAMP).unlink(missing_ok=True)

    @contextmanager
    def _host_lock(self) -> Iterator[None]:
        """One process of this host fills the cache at a time."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".cache.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # Writing: files first, the manifest last.
    @contextmanager
    def create(self, model_id: str, manifest: dict[str, Any]) -> Iterator[Path]:
        validate_model_id(model_id)
        if manifest.get("kind") not in KINDS:
            raise InvalidParams(f"`kind` must be one of {KINDS}, got {manifest.get('kind')!r}")
        if self.exists(model_id):
            raise ModelExists(f"a model with id {model_id!r} exists already")
        staging = self.root / ".staging" / f"{model_id}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            yield staging
            full, files = full_manifest(model_id, manifest, staging)
            for rel in files:
                self.store.upload(f"{PREFIX}/{model_id}/{rel}", staging / rel)
            if self.exists(model_id):  # published meanwhile by another writer
                raise ModelExists(f"a model with id {model_id!r} exists already")
            self.store.write(self._manifest_key(model_id), json.dumps(full, indent=2).encode())
            self._keep(staging, files)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _keep(self, staging: Path, files: dict[str, str]) -> None:
        """What this host just wrote goes into its cache: no download of it later."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        for rel, digest in files.items():
            blob = self.blobs / digest
            if not blob.exists():
                os.replace(staging / rel, blob)
                self._stamp(blob)

    def modify(self, model_id: str, change: Callable[[dict[str, Any]], None]
                ) -> dict[str, Any]:
        # One writer at a time on this host; manifests change rarely (reports, a preview
        # map) and only by appending or setting fields.
        with self._host_lock():
            manifest = self._manifest(model_id)
            change(manifest)
            self.store.write(self._manifest_key(model_id),
                             json.dumps(manifest, indent=2).encode())
        return manifest

    def _drop(self, model_id: str) -> None:
        self.store.delete(self._manifest_key(model_id))  # unlisted in one step
        for key in list(self.store.keys(f"{PREFIX}/{model_id}/")):
            self.store.delete(key)
        for key in list(self.store.keys(self._export_key(model_id, ""))):
            self.store.delete(key)
        shutil.rmtree(self.root / model_id, ignore_errors=True)
        shutil.rmtree(self.exports_dir(model_id), ignore_errors=True)

    # Exports live in the store beside the models (a hidden folder, never listed); each
    # host keeps the ones it served in its cache until the model goes.
    def _export_key(self, model_id: str, name: str) -> str:
        return f"{PREFIX}/{EXPORTS_DIR}/{validate_model_id(model_id)}/{name}"

    def export_file(self, model_id: str, name: str) -> Path | None:
        local = super().export_file(model_id, name)
        if local is not None:
            return local
        path = self.exports_dir(model_id) / name
        try:
            self.store.download(self._export_key(model_id, name), path)
        except FileNotFoundError:
            return None
        return path

    def keep_export(self, model_id: str, name: str, made: Path, keep: int = 0) -> Path:
        self.store.upload(self._export_key(model_id, name), made)
        return super().keep_export(model_id, name, made, keep)

    def _export_ages(self, model_id: str) -> dict[str, float]:
        # The store keeps no read times: on shared storage the oldest made go first.
        prefix = self._export_key(model_id, "")
        return {key[len(prefix):]: mtime for key, mtime in self.store.listing(prefix)}

    def _drop_export(self, model_id: str, name: str) -> None:
        self.store.delete(self._export_key(model_id, name))
        super()._drop_export(model_id, name)

    def unlisted(self) -> list[str]:
        """Folders of the store that hold files but no manifest: uploads cut short (or a
        removal that stopped half way), never listed as models."""
        listed = {m["id"] for m in self._manifests()}
        return [name for name in self.store.folders(PREFIX)
                if not name.startswith(".") and name not in listed]

    def reap(self, names: list[str]) -> None:
        """Remove the files of ``names`` (from ``unlisted``) unless one has been published
        since: a manifest that appeared meanwhile makes it a model, kept whole."""
        for name in names:
            if not self.exists(name):
                for key in list(self.store.keys(f"{PREFIX}/{name}/")):
                    self.store.delete(key)

    # What the workers' domains offer, merged in the store.
    def publish_domains(self, info: dict[str, dict[str, Any]]) -> None:
        with self._host_lock():
            merged = self.domains() | info
            self.store.write(f"{PREFIX}/{DOMAINS_FILE}",
                             json.dumps(merged, indent=2, sort_keys=True).encode())

    def domains(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self.store.read(f"{PREFIX}/{DOMAINS_FILE}"))
        except FileNotFoundError:
            return {}
