"""The model registry: a folder of models, each whole or absent.

``$LETHE_HOME/registry/<model-id>/`` holds ``manifest.json`` beside an ordinary diffusers
folder (a base model) or a ``unet_delta.safetensors`` (an edited one). A model is written
into a hidden staging folder and renamed into place, so a reader never sees half of one.
No torch here: the API reads the registry, the worker writes and loads it.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from app.accounts import Caller
from app.errors import InvalidParams, ModelExists, ModelNotFound, ModelProtected, shown

# Checked with fullmatch: with match and "$", "tiny-sd\n" would pass (and name a folder).
MODEL_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MANIFEST = "manifest.json"
KINDS = ("text-to-image", "upscaler", "classifier")
# What the workers' domains offer (worker.domains.published), for the API to read.
DOMAINS_FILE = ".domains.json"
MAX_REPORTS = 20
_STAGING = ".staging"
EXPORTS_DIR = ".exports"
_TRASH = ".trash"


# Ids the workers register at first start (worker.defaults and the shipped demo domain):
# no key may take one before a worker does (tests/worker/test_defaults.py keeps them equal).
SHIPPED_IDS = frozenset({"tiny-sd", "tiny-x4", "shapes-sd", "shapes-x4", "shapes-clf"})


def validate_model_id(model_id: str, field: str = "model") -> str:
    if not isinstance(model_id, str) or not MODEL_ID_RE.fullmatch(model_id):
        raise InvalidParams(
            f"`{field}` must match {MODEL_ID_RE.pattern} (lower-case letters, digits, '.', '_', "
            f"'-'; at most 64 characters), got {shown(model_id)}"
        )
    return model_id


def reserved_ids(settings: Any) -> frozenset[str]:
    """Ids no request may give a new model: the shipped ones and the configured defaults."""
    return SHIPPED_IDS | {settings.default_model, settings.default_upscaler}


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` but the manifest, by relative path."""
    return {
        p.relative_to(folder).as_posix(): file_digest(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def combined_digest(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]}\n".encode())
    return h.hexdigest()


def full_manifest(model_id: str, manifest: dict[str, Any], staging: Path
                  ) -> tuple[dict[str, Any], dict[str, str]]:
    """The manifest a model is published with (id, time, its files' digests and bytes), and
    those digests by file."""
    files = folder_digests(staging)
    size = sum((staging / rel).stat().st_size for rel in files)
    return {"id": model_id, "created_at": utcnow(), **manifest, "files": files,
            "digest": combined_digest(files), "bytes": size}, files


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Registry:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        # Whose eyes ``get`` and ``models`` read with (``seen_by``); None: the whole
        # registry, as the workers and the host's own commands see it.
        self.viewer: Caller | None = None

    def seen_by(self, caller: Caller) -> Registry:
        """This registry as ``caller`` sees it: another key's private models are absent
        (``ModelNotFound``, as another's jobs are), and another's public model does not
        show who made it (a bare key's name is derived from the key)."""
        view = copy.copy(self)
        view.viewer = caller
        return view

    def _as_seen(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        viewer = self.viewer
        if viewer is None or viewer.may_see(manifest.get("owner")):
            return manifest
        # A manifest without ``visibility`` (the operator's models, older edits) is public.
        if manifest.get("visibility") == "private":
            return None
        return {k: v for k, v in manifest.items() if k != "owner"}

    def path(self, model_id: str) -> Path:
        return self.root / validate_model_id(model_id)

    def local_folder(self, model_id: str) -> Path | None:
        """The model's folder where its files are on this host's disk already; None where
        reading them would fetch them (``ObjectRegistry``)."""
        return self.path(model_id)

    def exists(self, model_id: str) -> bool:
        return MODEL_ID_RE.fullmatch(model_id or "") is not None and (
            self.root / model_id / MANIFEST
        ).is_file()

    def get(self, model_id: str) -> dict[str, Any]:
        """The manifest of ``model_id`` as the viewer sees it; ``ModelNotFound`` where it
        is absent or another key's private model."""
        seen = self._as_seen(self._manifest(model_id))
        if seen is None:
            raise ModelNotFound(f"`model` {model_id!r} is not in the registry")
        return seen

    def models(self) -> list[dict[str, Any]]:
        """Every manifest the viewer may see, by id."""
        return [seen for m in self._manifests() if (seen := self._as_seen(m)) is not None]

    def _manifest(self, model_id: str) -> dict[str, Any]:
        validate_model_id(model_id)
        try:
            return json.loads((self.root / model_id / MANIFEST).read_text())
        except FileNotFoundError:
            raise ModelNotFound(f"`model` {model_id!r} is not in the registry") from None

    def _manifests(self) -> list[dict[str, Any]]:
        if not self.root.is_dir():
            return []
        out = []
        for child in sorted(self.root.iterdir()):
            # Hidden folders are staging and trash: never a model.
            if child.name.startswith(".") or not (child / MANIFEST).is_file():
                continue
            out.append(json.loads((child / MANIFEST).read_text()))
        return out

    def check_new_id(self, model_id: str, field: str, reserved: frozenset[str]) -> str:
        """``model_id`` if a request may name a new model so (``field`` in the message)."""
        validate_model_id(model_id, field)
        if model_id in reserved:
            raise ModelExists(f"`{field}` {model_id!r} is reserved for a model this service "
                              "ships or defaults to; pick another")
        if self.exists(model_id):
            raise ModelExists(f"`{field}` {model_id!r} exists already; pick another or "
                              "delete it")
        return model_id

    def bytes_of(self, owner: str) -> int:
        """Bytes of the models ``owner``'s jobs made (uploads, edits)."""
        return sum(int(m.get("bytes") or 0) for m in self._manifests()
                   if m.get("owner") == owner)

    def visibility_of(self, model_id: str) -> str:
        return self._manifest(model_id).get("visibility", "public")

    def public_children(self, model_id: str) -> list[str]:
        return [m["id"] for m in self.children(model_id)
                if m.get("visibility", "public") == "public"]

    def free_id(self, stem: str) -> str:
        """``stem``, or ``stem-2``, ``stem-3``... whichever no model has yet."""
        name, n = stem, 2
        while self.exists(name):
            name, n = f"{stem}-{n}", n + 1
        return name

    def reference_for(self, base: str, concept: str) -> dict[str, Any] | None:
        """The manifest of the model retrained from ``base``'s recipe without ``concept``
        (``lethe train DOMAIN --without CONCEPT``: the standard its erasures are measured
        against, ``worker.reference``), None where there is none."""
        wanted = {"base": base, "concept": concept}
        return next((m for m in self.models() if m.get("reference_for") == wanted), None)

    def children(self, model_id: str) -> list[dict[str, Any]]:
        """The manifests of the models made from ``model_id``: every key's (a base stays
        while anyone's edit, private or not, derives from it)."""
        return [m for m in self._manifests() if (m.get("base") or {}).get("id") == model_id]

    @contextmanager
    def create(self, model_id: str, manifest: dict[str, Any]) -> Iterator[Path]:
        """Yield a staging folder to fill; on success it appears as ``<model_id>`` whole.

        The manifest gets id, created_at and file digests added here, after the caller
        has written every file.
        """
        validate_model_id(model_id)
        if manifest.get("kind") not in KINDS:
            raise InvalidParams(f"`kind` must be one of {KINDS}, got {manifest.get('kind')!r}")
        if self.exists(model_id):
            raise ModelExists(f"a model with id {model_id!r} exists already")
        staging = self.root / _STAGING / f"{model_id}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            yield staging
            full, files = full_manifest(model_id, manifest, staging)
            (staging / MANIFEST).write_text(json.dumps(full, indent=2))
            _fsync_tree(staging)
            target = self.root / model_id
            try:
                # mkdir is the lock: rename(2) would replace an empty folder silently.
                target.mkdir()
            except FileExistsError:
                raise ModelExists(f"a model with id {model_id!r} exists already") from None
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def modify(self, model_id: str, change: Callable[[dict[str, Any]], None]
                ) -> dict[str, Any]:
        """Read, ``change`` in place and atomically rewrite a manifest, one writer at a time
        across processes: two reports written at once must both land (a read-modify-write
        without the lock keeps only the later one)."""
        self.get(model_id)  # an unknown id is a 404, not a lock file in a missing folder
        with open(self.root / model_id / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                manifest = self._manifest(model_id)  # whole, whoever changes it
                change(manifest)
                tmp = self.root / model_id / f".{MANIFEST}.{uuid.uuid4().hex[:8]}"
                tmp.write_text(json.dumps(manifest, indent=2))
                os.replace(tmp, self.root / model_id / MANIFEST)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return manifest

    def update_manifest(self, model_id: str, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into a manifest (metrics, reports), replacing the file atomically."""
        return self.modify(model_id, lambda m: m.update(fields))

    def add_report(self, model_id: str, report: dict[str, Any]) -> dict[str, Any]:
        """Append an evaluation report to the manifest's ``reports`` (its newest
        ``MAX_REPORTS`` kept: a manifest is read whole on every request that names it)."""
        return self.modify(model_id, lambda m: m.update(
            reports=[*m.get("reports", []), report][-MAX_REPORTS:]))

    def remove(self, model_id: str) -> None:
        """Remove a model a key made (an edit, an upload). The operator's base models (no
        owner) and models others derive from stay."""
        manifest = self.get(model_id)
        if not manifest.get("base") and not manifest.get("owner"):
            raise ModelProtected(
                f"`model` {model_id!r} is a base model of the service; only models a key "
                "made (edits, uploads) can be deleted over the API (use `lethe models rm "
                "--force` on the host)"
            )
        self._remove_checked(model_id)

    def force_remove(self, model_id: str) -> None:
        self.get(model_id)
        self._remove_checked(model_id)

    def _remove_checked(self, model_id: str) -> None:
        children = self.children(model_id)
        if children:
            shown_ids = [m["id"] for m in children if self._as_seen(m) is not None]
            hidden = len(children) - len(shown_ids)
            raise ModelProtected(
                f"`model` {model_id!r} is the base of {shown_ids}"
                + (f" and {hidden} private model(s) of other keys" if hidden else "")
                + "; remove those first")
        self._drop(model_id)

    def _drop(self, model_id: str) -> None:
        """Take a model out of the registry (its children were checked), exports too."""
        trash = self.root / _TRASH / f"{model_id}-{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.root / model_id, trash)  # gone from listings in one step
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(self.exports_dir(model_id), ignore_errors=True)

    def exports_dir(self, model_id: str) -> Path:
        """Where a model's downloadable exports are kept (hidden: never a model itself);
        they go with the model."""
        return self.root / EXPORTS_DIR / validate_model_id(model_id)

    def export_file(self, model_id: str, name: str) -> Path | None:
        """The export ``name`` of a model as a local file, or None while it is not made."""
        path = self.exports_dir(model_id) / name
        return path if path.is_file() else None

    def keep_export(self, model_id: str, name: str, made: Path, keep: int = 0) -> Path:
        """File the export just written at ``made`` (moved: it appears whole or not at
        all) where ``export_file`` finds it; past ``keep`` files of the model (0: no
        bound), the least recently used others go."""
        target = self.exports_dir(model_id) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(made, target)
        if keep > 0:
            ages = self._export_ages(model_id)
            ages.pop(name, None)
            for old in sorted(ages, key=ages.__getitem__)[:max(0, len(ages) - keep + 1)]:
                self._drop_export(model_id, old)
        return target

    def used_export(self, path: Path) -> None:
        """Mark an export as served now (``keep_export`` drops the least recently used)."""
        try:
            os.utime(path)
        except OSError:  # removed meanwhile: it is being served from an open file
            pass

    def _export_ages(self, model_id: str) -> dict[str, float]:
        """The model's kept exports by name, with when each was last made or served."""
        folder = self.exports_dir(model_id)
        if not folder.is_dir():
            return {}
        return {p.name: p.stat().st_mtime for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".")}

    def _drop_export(self, model_id: str, name: str) -> None:
        (self.exports_dir(model_id) / name).unlink(missing_ok=True)

    def publish_domains(self, info: dict[str, dict[str, Any]]) -> None:
        """Merge a worker's domain facts into ``DOMAINS_FILE``: each worker adds what it
        knows (a plug-in domain included) and nobody takes away what another published."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".domains.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                merged = self.domains() | info
                tmp = self.root / f".domains.{uuid.uuid4().hex[:8]}.tmp"
                tmp.write_text(json.dumps(merged, indent=2, sort_keys=True))
                os.replace(tmp, self.root / DOMAINS_FILE)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def domains(self) -> dict[str, dict[str, Any]]:
        """What the workers published about each domain, by name ({} before any did)."""
        try:
            return json.loads((self.root / DOMAINS_FILE).read_text())
        except FileNotFoundError:
            return {}

    def import_folder(
        self, source: Path, model_id: str, manifest: dict[str, Any], move: bool = False
    ) -> dict[str, Any]:
        """Copy a model folder in whole (``move``: move it, a staging folder of the caller's
        that is not needed after); the caller has checked that it loads."""
        source = Path(source)
        if not source.is_dir():
            raise InvalidParams(f"`path` must be a folder, got {str(source)!r}")
        with self.create(model_id, manifest) as staging:
            for item in source.iterdir():
                if item.name == MANIFEST:
                    continue
                dest = staging / item.name
                if move:
                    shutil.move(item, dest)
                else:
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, dest)
        return self.get(model_id)


def open_registry(settings: Any) -> Registry:
    """The registry the settings name: the folder under LETHE_HOME, or shared storage
    (``LETHE_STORAGE_URL``) with this host's cache (``app.objectregistry``)."""
    if not settings.storage_url:
        return Registry(settings.registry_dir)
    from app.objectregistry import ObjectRegistry
    from app.storage import open_storage

    return ObjectRegistry(open_storage(settings.storage_url, settings.s3_endpoint_url),
                          settings.home / "cache", settings.storage_cache_bytes)


def _fsync_tree(folder: Path) -> None:
    # Data reaches the disk before the rename that publishes it.
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
