"""Job functions the queues name by dotted path (``worker.jobs.generate``).

Each takes the API's validated ``params`` dict, reports progress in ``job.meta`` and
returns a JSON-able result. Errors a user can act on are stored as ``meta["error"]``
(code and message); the traceback stays in the worker log.
"""

from __future__ import annotations

import json
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

from app import jobfiles
from app.errors import LetheError, ModelExists
from app.queue import cancel_key
from app.registry import utcnow
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

    return run


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
    # Written beside the target and renamed: a client never downloads half a PNG.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _image_entry(job_id: str, index: int, name: str, image: Any, seed: int,
                 **extra: Any) -> dict:
    return {"index": index, "file": name, "url": f"/jobs/{job_id}/images/{index}",
            "width": image.width, "height": image.height, "seed": seed, **extra}


def _upscale_params(up: dict, seed: int) -> Any:
    from worker.upscale import UpscaleParams

    return UpscaleParams(prompt=up["prompt"], steps=up["steps"],
                         guidance_scale=up["guidance_scale"], noise_level=up["noise_level"],
                         seed=seed, tile=up["tile"], overlap=up["overlap"])


def _upscale_steps(up: dict, width: int, height: int) -> int:
    from worker.upscale import plan

    return len(plan(width, height, up["tile"], up["overlap"])) * up["steps"]


def run_generate(params: dict, reporter: Reporter, job_id: str) -> dict:
    """Generate ``num_images`` images; image ``i`` uses seed ``seed + i``.

    Seeding each image on its own makes an image depend only on its own seed and params,
    not on how many images were asked for in the same request, nor on which other jobs
    share the pipeline call (``worker.batching``). With ``upscale`` (a cascade) each image
    is then upscaled ×4 in the same job; progress counts both stages' steps.
    """
    from worker import batching

    ctx = get_context()
    job = get_current_job()
    batchable = job is not None and batching.batch_key(params) is not None
    if batchable:
        # Another worker's batch may have run it, or may be running it now.
        ready = batching.collect(job.connection, job_id, reporter.check)
        if ready is not None:
            reporter.progress(params["steps"], params["steps"], "done", force=True)
            return ready
    companions = (batching.claim_companions(job, params, ctx.settings.batch_max_images,
                                            ctx.settings.generate_timeout_s)
                  if batchable and ctx.settings.batch_max_images > 1 else [])
    members = [(job_id, params)] + [(c.id, c.kwargs["params"]) for c in companions]
    try:
        results = _generate_members(members, reporter)
    except BaseException:
        if companions:
            batching.release(job.connection, companions)
        raise
    for (member_id, _), result in zip(members[1:], results[1:], strict=True):
        if result is not None:
            batching.deliver(job.connection, member_id, result, ctx.settings.result_ttl_s)
    if companions:
        log.info("job %s ran %d queued jobs in its batch", job_id, len(companions))
    return results[0]


def _generate_members(members: list[tuple[str, dict]], reporter: Reporter
                      ) -> list[dict | None]:
    """One pipeline call for every member's images; each member's result, in order (None
    for a companion canceled meanwhile)."""
    from worker.batching import merged_inputs
    from worker.upscale import upscale

    ctx = get_context()
    params = members[0][1]  # the batch key makes the shared params equal for all
    steps, up = params["steps"], params.get("upscale")
    counts = [p["num_images"] for _, p in members]
    n = sum(counts)
    per_image = _upscale_steps(up, params["width"], params["height"]) if up else 0
    total = steps + n * per_image
    reporter.progress(0, total, "loading", force=True)
    t0 = time.perf_counter()
    base, cached = ctx.cache.get(params["model"])
    load_s = time.perf_counter() - t0
    pipe = with_scheduler(base, params["scheduler"])
    inputs = merged_inputs(members)
    reporter.progress(0, total, "denoising", force=True)
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = pipe(
            prompt=inputs["prompts"],
            negative_prompt=inputs["negatives"] if params.get("negative_prompt") else None,
            num_inference_steps=steps,
            guidance_scale=params["guidance_scale"],
            width=params["width"],
            height=params["height"],
            generator=[torch.Generator("cpu").manual_seed(s) for s in inputs["seeds"]],
            callback_on_step_end=reporter.step_callback(total, "denoising"),
        )
    run_s = time.perf_counter() - t1
    job = get_current_job()
    results, offset = [], 0
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
            images.append(_image_entry(member_id, i, f"{i}.png", image, p["seed"] + i,
                                       role="base"))
        # Whether this job's call carried the others; never another client's job id.
        results.append({"model": p["model"], "images": images, "cached": cached,
                        "worker": job.worker_name if job else None,
                        "timings": {"load_s": round(load_s, 4), "run_s": round(run_s, 4)},
                        "batch": {"jobs": len(members), "images": n, "led": position == 0}})
    if up:  # a cascade never batches: it is the only member
        first = results[0]
        t2 = time.perf_counter()
        up_pipe, _ = ctx.cache.get(up["model"])
        folder = jobfiles.output_dir(ctx.settings, members[0][0])
        for i, image in enumerate(out.images):
            big = upscale(up_pipe, image, _upscale_params(up, up["seed"] + i),
                          reporter.span(steps + i * per_image, total, "upscaling"))
            name = f"{i}-x4.png"
            save_png(big, folder / name)
            first["images"].append(_image_entry(members[0][0], n + i, name, big,
                                                up["seed"] + i, role="upscaled",
                                                source_index=i))
        first["timings"]["upscale_s"] = round(time.perf_counter() - t2, 4)
    reporter.progress(total, total, "done", force=True)
    return results


@job_function
def generate(params: dict, reporter: Reporter) -> dict:
    job = get_current_job()
    return run_generate(params, reporter, job.id if job else "local")


@job_function
def upscale(params: dict, reporter: Reporter) -> dict:
    """×4 of the image the API checked and stored at ``outputs/<params.input>``."""
    from PIL import Image

    from worker.upscale import plan, upscale

    ctx = get_context()
    job = get_current_job()
    job_id = job.id if job else "local"
    with Image.open(ctx.settings.outputs_dir / params["input"]) as stored:
        image = stored.convert("RGB")
    tiles = len(plan(*image.size, params["tile"], params["overlap"]))
    total = tiles * params["steps"]
    reporter.progress(0, total, "loading", force=True)
    t0 = time.perf_counter()
    pipe, cached = ctx.cache.get(params["model"])
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    big = upscale(pipe, image, _upscale_params(params, params["seed"]),
                  reporter.span(0, total, "upscaling"))
    run_s = time.perf_counter() - t1
    save_png(big, jobfiles.output_dir(ctx.settings, job_id) / "0.png")
    reporter.progress(total, total, "done", force=True)
    return {"model": params["model"], "cached": cached,
            "images": [_image_entry(job_id, 0, "0.png", big, params["seed"], role="upscaled")],
            "input": {"width": image.width, "height": image.height, "tiles": tiles},
            "worker": job.worker_name if job else None,
            "timings": {"load_s": round(load_s, 4), "run_s": round(run_s, 4)}}


# Images per prompt in an erase job's report: 48 per shape and 32 per colour on the
# "a {colour} {shape}" prompts, so one image moves a rate by about 2 to 3 points.
EVAL_PER_PROMPT = 8


def _evaluate_erasure(ctx: Any, params: dict, base_manifest: dict,
                      delta: dict[str, torch.Tensor], reporter: Reporter) -> dict:
    """Every concept's accuracy, and FID / precision / recall on the prompts the edit should
    leave alone, for the base (cached on its manifest), the edit, and the base with the
    concepts as a negative prompt: the inference-time way to avoid them, which the paper
    compares fine-tuning with."""
    from worker.domains import get_domain
    from worker.variants import build_variant

    domain = get_domain(base_manifest.get("domain"))
    clf, _ = ctx.cache.get(params["evaluator"])
    base_id = params["base_model"]
    base, _ = ctx.cache.get(base_id)
    guidance = (base_manifest.get("defaults") or {}).get("guidance_scale", 4.0)
    concepts = list(params["concepts"])
    negative = ", ".join(concepts)
    metrics = base_manifest.get("metrics") or {}

    def cached(kind: str, negative_prompt: str | None) -> dict:
        # Per set of erased concepts: the untouched prompts, and so the report, depend on it.
        nonlocal metrics
        key = f"{kind}:{','.join(sorted(concepts))}"
        reports = metrics.get("erasure_baselines") or {}
        report = reports.get(key)
        if (not report or report.get("protocol") != domain.report_protocol
                or report.get("per_prompt") != EVAL_PER_PROMPT):
            report = domain.erasure_report(base, clf, concepts, EVAL_PER_PROMPT, guidance,
                                           negative_prompt=negative_prompt)
            metrics = metrics | {"erasure_baselines": reports | {key: report}}
            ctx.registry.update_manifest(base_id, metrics=metrics)
        return report

    reporter.progress(0, 3, "evaluating", force=True)
    before = cached("base", None)
    reporter.check()
    reporter.progress(1, 3, "evaluating", force=True)
    negative_baseline = cached("negative_prompt", negative)
    reporter.check()
    reporter.progress(2, 3, "evaluating", force=True)
    variant = build_variant(base, delta, base_id).pipe
    after = domain.erasure_report(variant, clf, concepts, EVAL_PER_PROMPT, guidance)
    return {"before": before, "after": after, "negative_prompt": negative_baseline,
            "erased": concepts}


def _save_checkpoint(trainer: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(trainer.checkpoint(), tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint whole


def _publish(registry: Any, name: str, given: bool, manifest: dict,
             delta: dict[str, torch.Tensor]) -> str:
    """Write the edit as model ``name``; a derived name taken meanwhile (by another erase
    of the same concepts) moves on to the next free one. Returns the id written."""
    from worker.variants import save_delta

    while True:
        if not given:
            name = registry.free_id(name)
        try:
            with registry.create(name, manifest) as staging:
                save_delta(delta, staging)
            return name
        except ModelExists:
            if given:
                raise


@job_function
def erase(params: dict, reporter: Reporter) -> dict:
    """ESD fine-tune of ``base_model`` that writes model ``name`` (a UNet delta)."""
    from worker.esd import ESDConfig, ESDTrainer
    from worker.prompts import training_prompts

    ctx = get_context()
    job = get_current_job()
    job_id = job.id if job else "local"
    registry = ctx.registry
    base_manifest = registry.get(params["base_model"])
    given = params.get("name_given", True)
    if registry.exists(params["name"]) and given:
        raise ModelExists(f"`name` {params['name']!r} is taken: a model with that id exists")
    total = params["iterations"]
    reporter.progress(0, total, "loading", force=True)
    pipe, _ = ctx.cache.get(params["base_model"])
    style = params.get("train_prompts", "plain")
    prompts = training_prompts(params["concepts"], style, params.get("domain"),
                               preserve=bool(params.get("preserve")),
                               kind=params.get("concept_kind"),
                               preserve_prompts=params.get("preserve_prompts"))
    cfg = ESDConfig(
        concepts=tuple(params["concepts"]), prompts=prompts, method=params["method"],
        iterations=total,
        learning_rate=params["learning_rate"], negative_guidance=params["negative_guidance"],
        erase_from=params.get("erase_from"), ddim_steps=params["ddim_steps"],
        start_guidance=params["start_guidance"], seed=params["seed"],
        height=params["height"], width=params["width"],
    )
    trainer = ESDTrainer(pipe, cfg)
    ckpt = jobfiles.checkpoint_path(ctx.settings, job_id)
    resumed_from = None
    if ckpt.is_file():
        trainer.restore(torch.load(ckpt, weights_only=False))
        resumed_from = trainer.state.iteration
        reporter.set_meta(resumed_from=resumed_from)
        log.info("job %s resumes at iteration %d", job_id, trainer.state.iteration)
    every = max(1, ctx.settings.checkpoint_every)
    t0 = time.perf_counter()

    def on_step(i: int, loss: float) -> None:
        reporter.check()
        recent = trainer.state.losses[-20:]
        reporter.progress(i, total, "training", loss=round(sum(recent) / len(recent), 6))
        if i % every == 0 and i < total:
            _save_checkpoint(trainer, ckpt)

    trainer.train(on_step)
    train_s = time.perf_counter() - t0
    reporter.progress(total, total, "saving", force=True)
    losses = trainer.state.losses
    edit = {k: params[k] for k in ("method", "concepts", "iterations", "learning_rate",
                                   "negative_guidance", "erase_from", "seed", "ddim_steps",
                                   "start_guidance")}
    edit |= {"train_prompts": style, "preserve": bool(params.get("preserve")),
             "concept_kind": params.get("concept_kind"),
             "preserve_prompts": params.get("preserve_prompts"),
             "prompts": [{"prompt": p.prompt, "anchor": p.anchor}
                         | ({"preserve": p.preserve} if p.preserve else {})
                         for p in dict.fromkeys(prompts)]}
    manifest = {
        "kind": "text-to-image", "format": "delta",
        "base": {"id": params["base_model"], "digest": base_manifest["digest"]},
        "edit": edit | {"algorithm": "ESD (Gandikota et al., ICCV 2023)"},
        "training": {"loss_first": losses[0] if losses else None,
                     "loss_last20": sum(losses[-20:]) / max(1, len(losses[-20:])),
                     "seconds": round(train_s, 1), "job": job_id},
        "defaults": base_manifest.get("defaults"), "limits": base_manifest.get("limits"),
        # An edit draws the same domain: it is measured the same way (POST /evaluate).
        "domain": base_manifest.get("domain"), "evaluator": base_manifest.get("evaluator"),
    }
    delta = trainer.delta()
    if params.get("evaluate") and params.get("evaluator"):
        manifest["metrics"] = {
            "erasure": _evaluate_erasure(ctx, params, base_manifest, delta, reporter)}
    grid_entry, manifest["evidence"] = _erase_evidence(ctx, params, pipe, delta, job_id,
                                                       reporter)
    name = _publish(registry, params["name"], given, manifest, delta)
    ckpt.unlink(missing_ok=True)
    reporter.progress(total, total, "done", force=True)
    return {"model": name, "base": params["base_model"], "links": {"model": f"/models/{name}"},
            "iterations": total, "loss_last20": manifest["training"]["loss_last20"],
            "resumed_from": resumed_from, "images": [grid_entry],
            "evidence": manifest["evidence"]}


def _erase_evidence(ctx: Any, params: dict, pipe: Any,
                    delta: dict[str, torch.Tensor], job_id: str, reporter: Reporter
                    ) -> tuple[dict, dict]:
    """The comparison grid (stored as the job's image 0) and its report, for every erase."""
    from worker.domains import get_domain
    from worker.evidence import evidence
    from worker.variants import build_variant

    reporter.progress(0, 1, "evidence", force=True)
    edited = build_variant(pipe, delta, params["base_model"]).pipe
    clip = None
    if ctx.settings.clip_model_path is not None:
        from worker.features import ClipScorer

        clip = ClipScorer(ctx.settings.clip_model_path, pipe.device)
    grid, report = evidence(
        pipe, edited, get_domain(params.get("domain")), list(params["concepts"]),
        guidance=params["draw_guidance"], steps=params["draw_steps"],
        size=(params["height"], params["width"]), seed=params["seed"], check=reporter.check,
        kind=params.get("concept_kind"), preserve_prompts=params.get("preserve_prompts"),
        clip=clip)
    save_png(grid, jobfiles.output_dir(ctx.settings, job_id) / "grid.png")
    entry = _image_entry(job_id, 0, "grid.png", grid, params["seed"], role="grid")
    return entry, report | {"grid": entry["url"], "job": job_id}


@job_function
def evaluate(params: dict, reporter: Reporter) -> dict:
    """Draw a model's images and measure them; the report goes to the model's manifest."""
    from worker.evaluation import evaluate as run_evaluation

    ctx = get_context()
    job = get_current_job()
    job_id = job.id if job else "local"
    reporter.progress(0, 1, "loading", force=True)
    pipe, _ = ctx.cache.get(params["model"])
    clf = ctx.cache.get(params["evaluator"])[0] if params.get("evaluator") else None

    def on_progress(done: int, total: int, stage: str) -> None:
        reporter.check()
        reporter.progress(done, total, stage, force=stage != "drawing")

    t0 = time.perf_counter()
    report = run_evaluation(pipe, params, clf=clf, settings=ctx.settings,
                            on_progress=on_progress)
    report |= {"job": job_id, "seconds": round(time.perf_counter() - t0, 1),
               "created_at": utcnow()}
    out = jobfiles.output_dir(ctx.settings, job_id)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    ctx.registry.add_report(params["model"], report)
    reporter.progress(1, 1, "done", force=True)
    return {"report": report, "links": {"model": f"/models/{params['model']}"}}
