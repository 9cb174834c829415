"""What a job leaves on disk, and when it goes.

A job owns ``outputs/<job-id>/`` (its images, an upload's checked input, an evaluation's
report) and, for an erase, ``checkpoints/<job-id>.pt``. Files exist for the job's record:
what was refused, canceled or failed for good is removed at once by whoever ended it
(``discard``), and ``sweep`` removes what no ended job or no record at all claims any more
(a worker killed mid-job, a record expired after ``result_ttl_s``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from redis import Redis
from rq.job import Job
from rq.job import JobStatus as RQStatus

from app.config import Settings


def output_dir(settings: Settings, job_id: str) -> Path:
    return settings.outputs_dir / job_id


def checkpoint_path(settings: Settings, job_id: str) -> Path:
    return settings.home / "checkpoints" / f"{job_id}.pt"


def discard(settings: Settings, job_id: str) -> None:
    """Remove everything job ``job_id`` wrote."""
    shutil.rmtree(output_dir(settings, job_id), ignore_errors=True)
    checkpoint_path(settings, job_id).unlink(missing_ok=True)


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


def sweep(connection: Redis, settings: Settings, min_age_s: float = MIN_AGE_S) -> list[str]:
    """Remove the files of jobs that ended without success or whose record is gone
    (expired after ``result_ttl_s``, or purged), and the checkpoints of those that
    succeeded; returns their ids. ``min_age_s`` spares files written since: the API
    stores an upload before it queues the job that owns it."""
    now = time.time()
    owners: dict[str, list[Path]] = {}
    for folder in (settings.outputs_dir, settings.home / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(".") or now - _newest_write(path) < min_age_s:
                continue
            owners.setdefault(path.name.removesuffix(".pt"), []).append(path)
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
        elif status == RQStatus.FINISHED and checkpoint_path(settings, job_id).exists():
            checkpoint_path(settings, job_id).unlink(missing_ok=True)  # its images stay
        else:
            continue  # queued (a retry included) or running: its files are in use
        removed.append(job_id)
    return removed
