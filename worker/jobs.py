"""Job functions the queues name by dotted path (``worker.jobs.generate``).

Each takes the API's validated ``params`` dict, reports progress in ``job.meta`` and
returns a JSON-able result. Errors a user can act on are stored as ``meta["error"]``
(code and message); the traceback stays in the worker log.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import torch
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from app.errors import LetheError
from worker.context import get_context
from worker.pipelines import with_scheduler
from worker.progress import JobCanceled, Reporter

log = logging.getLogger("lethe.worker.jobs")


def job_function(fn: Callable[[dict, Reporter], dict]) -> Callable[..., dict]:
    """Wrap a job body: reporter set-up, cancel before start, errors into ``meta``."""

    @wraps(fn)
    def run(params: dict) -> dict:
        job = get_current_job()
        settings = get_context().settings
        reporter = Reporter(job, job.connection if job else None, settings.progress_interval_s)
        try:
            reporter.check()
            return fn(params, reporter)
        except JobCanceled:
            reporter.set_meta(canceled=True)
            log.info("job %s canceled", job.id if job else "-")
            raise
        except JobTimeoutException:
            reporter.set_meta(error={"code": "timeout",
                                     "message": f"the job ran past its limit of {job.timeout}s"
                                     if job else "the job ran past its time limit"})
            raise
        except LetheError as exc:
            reporter.set_meta(error={"code": exc.code, "message": exc.message})
            raise
        except Exception as exc:
            reporter.set_meta(error={"code": "job_failed",
                                     "message": f"{type(exc).__name__}: {str(exc)[:300]}"})
            raise

    return run


def save_png(image: Any, path: Path) -> None:
    # Written beside the target and renamed: a client never downloads half a PNG.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def run_generate(params: dict, reporter: Reporter, job_id: str) -> dict:
    """Generate ``num_images`` images; image ``i`` uses seed ``seed + i``.

    Seeding each image on its own makes an image depend only on its own seed and params,
    not on how many images were asked for in the same request.
    """
    ctx = get_context()
    steps, n = params["steps"], params["num_images"]
    reporter.progress(0, steps, "loading", force=True)
    t0 = time.perf_counter()
    base, cached = ctx.cache.get(params["model"])
    load_s = time.perf_counter() - t0
    pipe = with_scheduler(base, params["scheduler"])
    generators = [torch.Generator("cpu").manual_seed(params["seed"] + i) for i in range(n)]
    reporter.progress(0, steps, "denoising", force=True)
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = pipe(
            prompt=[params["prompt"]] * n,
            negative_prompt=[params["negative_prompt"]] * n if params.get("negative_prompt")
            else None,
            num_inference_steps=steps,
            guidance_scale=params["guidance_scale"],
            width=params["width"],
            height=params["height"],
            generator=generators,
            callback_on_step_end=reporter.step_callback(steps, "denoising"),
        )
    run_s = time.perf_counter() - t1
    folder = ctx.settings.outputs_dir / job_id
    images = []
    for i, image in enumerate(out.images):
        name = f"{i}.png"
        save_png(image, folder / name)
        images.append({"index": i, "file": name, "url": f"/jobs/{job_id}/images/{i}",
                       "width": image.width, "height": image.height,
                       "seed": params["seed"] + i})
    reporter.progress(steps, steps, "done", force=True)
    job = get_current_job()
    return {"model": params["model"], "images": images, "cached": cached,
            "worker": job.worker_name if job else None,
            "timings": {"load_s": round(load_s, 4), "run_s": round(run_s, 4)}}


@job_function
def generate(params: dict, reporter: Reporter) -> dict:
    job = get_current_job()
    return run_generate(params, reporter, job.id if job else "local")
