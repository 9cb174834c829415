"""The generate job: text to images, micro-batched with compatible queued jobs, optionally
upscaled ×4 in the same job (a cascade)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from rq import get_current_job

from app import jobfiles
from app.jobspecs import GenerateJob, UpscaleJob
from app.queue import cancel_key
from worker.context import get_context
from worker.jobs.base import image_entry, job_function, job_id, save_png
from worker.pipelines import rebuild, with_scheduler
from worker.progress import Reporter

log = logging.getLogger("lethe.worker.jobs")


def upscale_params(up: UpscaleJob, seed: int) -> Any:
    from worker.upscale import UpscaleParams

    return UpscaleParams(prompt=up.prompt, steps=up.steps, guidance_scale=up.guidance_scale,
                         noise_level=up.noise_level, seed=seed, tile=up.tile,
                         overlap=up.overlap)


def _upscale_steps(up: UpscaleJob, width: int, height: int) -> int:
    from worker.upscale import plan

    return len(plan(width, height, up.tile, up.overlap)) * up.steps


def run_generate(spec: GenerateJob, reporter: Reporter, job_id: str) -> dict:
    """Generate ``num_images`` images; image ``i`` uses seed ``seed + i``.

    Seeding each image on its own makes an image depend only on its own seed and params,
    not on how many images were asked for in the same request, nor on which other jobs
    share the pipeline call (``worker.batching``). With ``upscale`` (a cascade) each image
    is then upscaled ×4 in the same job; progress counts both stages' steps.
    """
    from worker import batching

    ctx = get_context()
    job = get_current_job()
    queued = spec.queued()
    # The RQ job when this one may batch (a cascade never does; nor a job run outside RQ).
    leader = job if job is not None and batching.batch_key(queued) is not None else None
    companions = []
    if leader is not None:
        # Another worker's batch may have run it, or may be running it now.
        ready = batching.collect(leader.connection, job_id, reporter.check)
        if ready is not None:
            reporter.progress(spec.steps, spec.steps, "done", force=True)
            return ready
        if ctx.settings.batch_max_images > 1:
            companions = batching.claim_companions(leader, queued,
                                                   ctx.settings.batch_max_images,
                                                   ctx.settings.generate_timeout_s)
    members = [(job_id, spec)] + [(c.id, GenerateJob.model_validate(c.kwargs["params"]))
                                  for c in companions]
    try:
        results = _generate_members(members, reporter)
    except BaseException:
        if leader is not None and companions:
            batching.release(leader.connection, companions)
        raise
    for (member_id, _), result in zip(members[1:], results[1:], strict=True):
        if leader is not None and result is not None:  # companions exist only with a leader
            batching.deliver(leader.connection, member_id, result, ctx.settings.result_ttl_s)
    if companions:
        log.info("job %s ran %d queued jobs in its batch", job_id, len(companions))
    first = results[0]
    assert first is not None  # the leader is never a canceled companion
    return first


def _generate_members(members: list[tuple[str, GenerateJob]], reporter: Reporter
                      ) -> list[dict | None]:
    """One pipeline call for every member's images; each member's result, in order (None
    for a companion canceled meanwhile)."""
    from worker.batching import merged_inputs
    from worker.upscale import upscale

    ctx = get_context()
    spec = members[0][1]  # the batch key makes the shared params equal for all
    steps, up = spec.steps, spec.upscale
    counts = [p.num_images for _, p in members]
    n = sum(counts)
    per_image = _upscale_steps(up, spec.width, spec.height) if up else 0
    total = steps + n * per_image
    reporter.progress(0, total, "loading", force=True)
    t0 = time.perf_counter()
    base, cached = ctx.cache.get(spec.model)
    load_s = time.perf_counter() - t0
    pipe = with_scheduler(base, spec.scheduler)
    callback = reporter.step_callback(total, "denoising")
    if spec.previews:  # never batched: the members are this job alone
        from worker.previews import Previewer, previewing

        pipe = rebuild(pipe, scheduler=previewing(pipe.scheduler))
        callback = Previewer(
            pipe, spec.previews, steps,
            lambda step, of, image: reporter.event("preview", {"step": step, "total": of,
                                                               "image": image}),
            _preview_map(ctx, spec, pipe)).wrap(callback)
    inputs = merged_inputs(members)
    reporter.progress(0, total, "denoising", force=True)
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = pipe(
            prompt=inputs["prompts"],
            negative_prompt=inputs["negatives"] if spec.negative_prompt else None,
            num_inference_steps=steps,
            guidance_scale=spec.guidance_scale,
            width=spec.width,
            height=spec.height,
            generator=[torch.Generator("cpu").manual_seed(s) for s in inputs["seeds"]],
            callback_on_step_end=callback,
        )
    run_s = time.perf_counter() - t1
    job = get_current_job()
    results: list[dict | None] = []
    offset = 0
    for position, ((member_id, p), count) in enumerate(zip(members, counts, strict=True)):
        batch_images, offset = out.images[offset:offset + count], offset + count
        if position and reporter.connection is not None and reporter.connection.exists(
                cancel_key(member_id)):
            results.append(None)  # canceled while in the batch: nothing of it is kept
            continue
        folder = jobfiles.output_dir(ctx.settings, member_id)
        images = []
        for i, image in enumerate(batch_images):
            save_png(image, folder / f"{i}.png")
            images.append(image_entry(member_id, i, f"{i}.png", image, p.seed + i,
                                      role="base"))
        # Whether this job's call carried the others; never another client's job id.
        results.append({"model": p.model, "images": images, "cached": cached,
                        "worker": job.worker_name if job else None,
                        "timings": {"load_s": round(load_s, 4), "run_s": round(run_s, 4)},
                        "batch": {"jobs": len(members), "images": n, "led": position == 0}})
    first = results[0]
    if up and first is not None:  # a cascade never batches: it is the only member
        t2 = time.perf_counter()
        up_pipe, _ = ctx.cache.get(up.model)
        folder = jobfiles.output_dir(ctx.settings, members[0][0])
        for i, image in enumerate(out.images):
            big = upscale(up_pipe, image, upscale_params(up, up.seed + i),
                          reporter.span(steps + i * per_image, total, "upscaling"))
            name = f"{i}-x4.png"
            save_png(big, folder / name)
            first["images"].append(image_entry(members[0][0], n + i, name, big, up.seed + i,
                                               role="upscaled", source_index=i))
        first["timings"]["upscale_s"] = round(time.perf_counter() - t2, 4)
    reporter.progress(total, total, "done", force=True)
    return results


def _preview_map(ctx: Any, spec: GenerateJob, pipe: Any) -> list[list[float]] | None:
    """The model's linear latent → RGB preview map, for images too large to preview through
    the VAE: fitted from its VAE the first time, then kept in its (or its base's) manifest."""
    from worker.previews import fit_preview_map, through_vae

    if through_vae(spec.height, spec.width):
        return None
    manifest = ctx.registry.get(spec.model)
    owner = (manifest.get("base") or {}).get("id") or spec.model  # the VAE is the base's
    saved = ctx.registry.get(owner).get("preview_map")
    if saved is None:
        saved = fit_preview_map(pipe.vae)
        ctx.registry.update_manifest(owner, preview_map=saved)
    return saved


@job_function(GenerateJob)
def generate(spec: GenerateJob, reporter: Reporter) -> dict:
    return run_generate(spec, reporter, job_id())
