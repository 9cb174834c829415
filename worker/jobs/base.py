"""What every job function shares: its spec validated, a reporter, cancels and errors
stored in ``job.meta``, and its files written whole or discarded."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from app import jobfiles
from app.errors import InvalidParams, LetheError
from app.jobspecs import JobSpec
from worker.context import get_context
from worker.progress import JobCanceled, JobSuperseded, Reporter

log = logging.getLogger("lethe.worker.jobs")


Spec = TypeVar("Spec", bound=JobSpec)


def job_function(spec_type: type[Spec]) -> Callable[[Callable[[Spec, Reporter], dict]],
                                                    Callable[..., dict]]:
    """Wrap a job body that takes a ``spec_type``: the queued params validated (a spec the
    worker does not understand fails as ``invalid_params``), reporter set-up, cancel before
    start, errors into ``meta``."""

    def wrap(fn: Callable[[Spec, Reporter], dict]) -> Callable[..., dict]:
        @wraps(fn)
        def run(params: dict) -> dict:
            return _run(fn, spec_type, params)

        return run

    return wrap


def _run(fn: Callable[[Spec, Reporter], dict], spec_type: type[Spec], params: dict) -> dict:
    job = get_current_job()
    settings = get_context().settings
    reporter = Reporter(job, job.connection if job else None, settings.progress_interval_s,
                        settings.result_ttl_s)
    try:
        reporter.check()
        reporter.event("started", {"worker": job.worker_name if job else None})
        try:
            spec = spec_type.model_validate(params)
        except ValidationError as exc:
            raise InvalidParams(f"this worker cannot run the job's params: {exc}") from None
        return fn(spec, reporter)
    except JobSuperseded:
        # Another worker runs the job now: its meta and files are that run's, not ours.
        log.warning("job %s: run again elsewhere while this worker was cut off; this run "
                    "stops and leaves the job to it", job.id if job else "-")
        raise
    except JobCanceled:
        reporter.set_meta(canceled=True)
        log.info("job %s canceled", job.id if job else "-")
        _discard_unless_retried(settings, job, canceled=True)
        raise
    except JobTimeoutException:
        reporter.set_meta(error={"code": "timeout",
                                 "message": f"the job ran past its limit of {job.timeout}s"
                                 if job else "the job ran past its time limit"})
        _discard_unless_retried(settings, job)
        raise
    except LetheError as exc:
        reporter.set_meta(error={"code": exc.code, "message": exc.message})
        if job is not None:  # a refusal comes out the same each time: retries are
            job.retries_left = 0  # for lost workers and Redis, not for this
        _discard_unless_retried(settings, job)
        raise
    except Exception as exc:
        reporter.set_meta(error={"code": "job_failed",
                                 "message": _shown_error(exc, settings)})
        _discard_unless_retried(settings, job)
        raise


def _shown_error(exc: Exception, settings: Any) -> str:
    """An unexpected error as a client may see it: its type and text, with this machine's
    data folder named by its setting (a FileNotFoundError would show the path)."""
    text = f"{type(exc).__name__}: {exc}".replace(str(settings.home.resolve()), "$LETHE_HOME")
    return text.replace(str(settings.home), "$LETHE_HOME")[:300]


def _discard_unless_retried(settings: Any, job: Any, canceled: bool = False) -> None:
    """A job that ends without success leaves nothing behind: no partial images, no
    upload, no checkpoint. One that RQ will run again (retries left) keeps its checkpoint."""
    if job is not None and (canceled or not job.retries_left):
        jobfiles.discard(settings, job.id)


def save_png(image: Any, path: Path) -> None:
    # Written beside the target and renamed: a client never downloads half a PNG; then
    # shared with the other hosts when there is shared storage.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    jobfiles.share(get_context().settings, path)


def image_entry(job_id: str, index: int, name: str, image: Any, seed: int,
                **extra: Any) -> dict:
    return {"index": index, "file": name, "url": f"/jobs/{job_id}/images/{index}",
            "width": image.width, "height": image.height, "seed": seed, **extra}


def job_id() -> str:
    job = get_current_job()
    return job.id if job else "local"


def owned(visibility: str = "public") -> dict[str, str]:
    """``{"owner": <key name>, "visibility": ...}`` of the running job, for the manifest of
    a model it makes (its owner may delete it, and alone sees it if private); empty outside
    a job or for an unowned one (the host's own commands make the operator's models)."""
    job = get_current_job()
    owner = job.meta.get("owner") if job else None
    return {"owner": owner, "visibility": visibility} if owner else {}
