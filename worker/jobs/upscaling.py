"""The upscale job: ×4 of an image the API checked and stored."""

from __future__ import annotations

import time

from PIL import Image
from rq import get_current_job

from app import jobfiles
from app.errors import InvalidParams
from app.jobspecs import UpscaleJob
from worker.context import get_context
from worker.jobs.base import image_entry, job_function, job_id, save_png
from worker.jobs.generation import upscale_params
from worker.progress import Reporter


@job_function(UpscaleJob)
def upscale(spec: UpscaleJob, reporter: Reporter) -> dict:
    """×4 of the image stored at ``outputs/<spec.input>``."""
    from worker.upscale import plan, upscale

    ctx = get_context()
    job = get_current_job()
    this = job_id()
    if spec.input is None:
        raise InvalidParams("an upscale job needs `input`, the stored image to upscale")
    stored_at = ctx.settings.outputs_dir / spec.input
    if not jobfiles.fetch(ctx.settings, stored_at):
        raise InvalidParams(f"the image to upscale ({spec.input}) is no longer stored")
    with Image.open(stored_at) as stored:
        image = stored.convert("RGB")
    tiles = len(plan(*image.size, spec.tile, spec.overlap))
    total = tiles * spec.steps
    reporter.progress(0, total, "loading", force=True)
    t0 = time.perf_counter()
    pipe, cached = ctx.cache.get(spec.model)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    big = upscale(pipe, image, upscale_params(spec, spec.seed),
                  reporter.span(0, total, "upscaling"))
    run_s = time.perf_counter() - t1
    save_png(big, jobfiles.output_dir(ctx.settings, this) / "0.png")
    reporter.progress(total, total, "done", force=True)
    return {"model": spec.model, "cached": cached,
            "images": [image_entry(this, 0, "0.png", big, spec.seed, role="upscaled")],
            "input": {"width": image.width, "height": image.height, "tiles": tiles},
            "worker": job.worker_name if job else None,
            "timings": {"load_s": round(load_s, 4), "run_s": round(run_s, 4)}}
