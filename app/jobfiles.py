"""What a job leaves on disk, and when it goes.

A job owns ``outputs/<job-id>/`` (its images, an upload's checked input, an evaluation's
report) and, for an erase, ``checkpoints/<job-id>.pt``. Files exist for the job's record:
what was refused, canceled or failed for good is removed at once by whoever ended it
(``discard``), and ``sweep`` removes what no ended job or no record at all claims any more
(a worker killed mid-job, a record expired after ``result_ttl_s``).

With shared storage (``LETHE_STORAGE_URL``) the same files also live there, under the same
keys (``outputs/<job-id>/0.png``): whoever writes one shares it (``share``), whoever needs
one on another host fetches it (``fetch``, into its own ``LETHE_HOME``, a cache). Without
it, ``share`` and ``fetch`` do nothing: the folder is the only copy.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from redis import Redis
from rq.job import Job
from rq.job import JobStatus as RQStatus

from app.config import Settings
from app.errors import ImageNotFound, JobNotFinished
from app.storage import Storage, open_storage


def remote(settings: Settings) -> Storage | None:
    """The shared storage, or None when the folder under LETHE_HOME is all there is."""
    if not settings.storage_url:
        return None
    return open_storage(settings.storage_url, settings.s3_endpoint_url)


def _key(settings: Settings, path: Path) -> str:
    return path.resolve().relative_to(settings.home.resolve()).as_posix()


def share(settings: Settings, path: Path) -> None:
    """Put the file just written at ``path`` (under LETHE_HOME) where other hosts find it."""
    store = remote(settings)
    if store is not None:
        store.upload(_key(settings, path), path)


def fetch(settings: Settings, path: Path) -> bool:
    """Whether the file ``path`` (under LETHE_HOME) is here, fetched from shared storage
    if another host wrote it."""
    if path.is_file():
        return True
    store = remote(settings)
    if store is None:
        return False
    try:
        store.download(_key(settings, path), path)
    except FileNotFoundError:
        return False
    return True


def output_dir(settings: Settings, job_id: str) -> Path:
    return settings.outputs_dir / job_id


def checkpoint_path(settings: Settings, job_id: str) -> Path:
    return settings.home / "checkpoints" / f"{job_id}.pt"


def discard(settings: Settings, job_id: str) -> None:
    """Remove everything job ``job_id`` wrote, here and in shared storage."""
    shutil.rmtree(output_dir(settings, job_id), ignore_errors=True)
    checkpoint_path(settings, job_id).unlink(missing_ok=True)
    store = remote(settings)
    if store is not None:
        for key in [*store.keys(f"outputs/{job_id}/"), f"checkpoints/{job_id}.pt"]:
            store.delete(key)


def remove(settings: Settings, path: Path) -> None:
    """A file that has served (an imported upload, a published erase's checkpoint): gone,
    here and in shared storage."""
    path.unlink(missing_ok=True)
    store = remote(settings)
    if store is not None:
        store.delete(_key(settings, path))


def drop_checkpoint(settings: Settings, job_id: str) -> None:
    remove(settings, checkpoint_path(settings, job_id))


# States whose files nobody can ask for any more; a succeeded job keeps its images.
_ENDED_WITHOUT_FILES = {RQStatus.FAILED, RQStatus.STOPPED, RQStatus.CANCELED}
MIN_AGE_S = 10.0  # files written more recently than this are never swept


def _newest_write(path: Path) -> float:
    """When ``path`` (a file, or a folder and the files in it) was last written: an upload
    still streaming in keeps its folder young."""
    try:
        times = [path.stat().st_mtime]
        if path.is_dir():
            times += [child.stat().st_mtime for child in path.iterdir()]
    except FileNotFoundError:  # removed meanwhile (a job discarding its own files)
        return time.time()
    return max(times)


def _shared_owners(settings: Settings, before: float) -> dict[str, set[str]]:
    """The jobs with files in shared storage last written before ``before``: for each,
    what it has there (``outputs``, ``checkpoint``). A job with any newer file is left."""
    store = remote(settings)
    if store is None:
        return {}
    found: dict[str, set[str]] = {}
    newest: dict[str, float] = {}
    for key, written in [*store.listing("outputs/"), *store.listing("checkpoints/")]:
        area, _, rest = key.partition("/")
        job_id = rest.split("/")[0].removesuffix(".pt")
        found.setdefault(job_id, set()).add("checkpoint" if area == "checkpoints"
                                            else "outputs")
        newest[job_id] = max(newest.get(job_id, 0.0), written)
    return {job_id: kinds for job_id, kinds in found.items() if newest[job_id] < before}


def sweep(connection: Redis, settings: Settings, min_age_s: float = MIN_AGE_S) -> list[str]:
    """Remove the files of jobs that ended without success or whose record is gone
    (expired after ``result_ttl_s``, or purged), and the checkpoints of those that
    succeeded; returns their ids. ``min_age_s`` spares files written since: the API
    stores an upload before it queues the job that owns it."""
    now = time.time()
    owners: set[str] = set()
    for folder in (settings.outputs_dir, settings.home / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(".") or now - _newest_write(path) < min_age_s:
                continue
            owners.add(path.name.removesuffix(".pt"))
    shared = _shared_owners(settings, now - min_age_s)
    owners |= set(shared)
    if not owners:
        return []
    ids = sorted(owners)
    with connection.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(Job.key_for(job_id), "status")
        statuses = pipe.execute()
    removed = []
    for job_id, raw in zip(ids, statuses, strict=True):
        status = raw.decode() if raw is not None else None
        if status is None or status in _ENDED_WITHOUT_FILES:
            discard(settings, job_id)
        elif status == RQStatus.FINISHED and (checkpoint_path(settings, job_id).exists()
                                              or "checkpoint" in shared.get(job_id, ())):
            drop_checkpoint(settings, job_id)  # its images stay
        else:
            continue  # queued (a retry included) or running: its files are in use
        removed.append(job_id)
    return removed


def stored_image(settings: Settings, view: dict, index: int, field: str = ""
                 ) -> tuple[Path, dict]:
    """Image ``index`` of the job ``view`` (as ``GET /jobs/{id}`` shows it): its path,
    fetched from shared storage where another host made it, and its entry. 409 before the
    job succeeded, 404 for an index it does not have or an image no longer kept;
    ``field`` prefixes the request's names in the messages (``source.``)."""
    job_id = view["id"]
    if view["status"] != "succeeded":
        raise JobNotFinished(f"`{field}job_id` {job_id!r} is {view['status']}; a job's "
                             "images exist once it has succeeded")
    images = (view["result"] or {}).get("images", [])
    if not 0 <= index < len(images):
        raise ImageNotFound(f"`{field}index` must be between 0 and {len(images) - 1} for "
                            f"job {job_id!r}, got {index}")
    path = output_dir(settings, job_id) / images[index]["file"]
    if not fetch(settings, path):
        raise ImageNotFound(f"image {index} of job {job_id!r} is no longer stored")
    return path, images[index]
