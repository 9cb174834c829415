"""The erase job: an ESD fine-tune of a base model, published as a new model (a UNet
delta) with its evidence: a same-seed comparison grid, the neighbour prompts' drift
measured during training and at the end, and, where the base names an evaluator, every
concept's accuracy before and after."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from rq import get_current_job

from app import jobfiles, metrics
from app.errors import ModelExists
from app.jobspecs import EraseJob
from app.registry import Registry
from worker.context import WorkerContext, get_context
from worker.jobs.base import image_entry, job_function, job_id, owned, save_png
from worker.progress import Reporter

log = logging.getLogger("lethe.worker.jobs")

# Images per prompt in an erase job's report: 48 per shape and 32 per colour on the
# "a {colour} {shape}" prompts, so one image moves a rate by about 2 to 3 points.
EVAL_PER_PROMPT = 8


def drift_points(iterations: int, checks: int) -> list[int]:
    """The iterations after which the neighbours' drift is measured: ``checks`` of them
    spread evenly before the end (the end's own is the evidence's)."""
    return sorted({round(iterations * k / (checks + 1)) for k in range(1, checks + 1)}
                  - {0, iterations})


def _evaluate_erasure(ctx: WorkerContext, spec: EraseJob,
                      edited: Any, reporter: Reporter) -> dict:
    """Every concept's accuracy, and FID / precision / recall on the prompts the edit should
    leave alone, for the base (cached on its manifest), the edit, the base with the concepts
    as a negative prompt (the inference-time way to avoid them, which the paper compares
    fine-tuning with) and, where the registry has one, the model retrained without each
    concept (``worker.reference``: cached on its manifest), with the edit's gap to it."""
    from worker.domains import get_domain
    from worker.reference import missing

    domain = get_domain(spec.domain)
    assert spec.evaluator is not None  # the API sets evaluate only with an evaluator
    clf, _ = ctx.cache.get(spec.evaluator)
    concepts = list(spec.concepts)
    negative = ", ".join(concepts)

    def cached(model_id: str, kind: str, negative_prompt: str | None) -> dict:
        # Per set of erased concepts: the untouched prompts, and so the report, depend on it.
        key = f"{kind}:{','.join(sorted(concepts))}"
        report = ((ctx.registry.get(model_id).get("metrics") or {})
                  .get("erasure_baselines") or {}).get(key)
        if (not report or report.get("protocol") != domain.report_protocol
                or report.get("per_prompt") != EVAL_PER_PROMPT
                or report.get("guidance") != spec.draw_guidance):
            report = domain.erasure_report(ctx.cache.get(model_id)[0], clf, concepts,
                                           EVAL_PER_PROMPT, spec.draw_guidance,
                                           negative_prompt=negative_prompt)

            def keep(manifest: dict) -> None:
                metrics = manifest.get("metrics") or {}
                manifest["metrics"] = metrics | {"erasure_baselines": (
                    metrics.get("erasure_baselines") or {}) | {key: report}}
            ctx.registry.modify(model_id, keep)
        return report

    found = {c: ctx.registry.reference_for(spec.base_model, c) for c in concepts}
    total = 3 + sum(m is not None for m in found.values())
    reporter.progress(0, total, "evaluating", force=True)
    before = cached(spec.base_model, "base", None)
    reporter.check()
    reporter.progress(1, total, "evaluating", force=True)
    negative_baseline = cached(spec.base_model, "negative_prompt", negative)
    reporter.check()
    reporter.progress(2, total, "evaluating", force=True)
    after = domain.erasure_report(edited, clf, concepts, EVAL_PER_PROMPT, spec.draw_guidance)
    references: dict[str, Any] = {}
    for concept, manifest in found.items():
        if manifest is None:
            references[concept] = {"model": None,
                                   "note": missing(domain, spec.base_model, concept)}
            continue
        reporter.check()
        reporter.progress(2 + len(references), total, "evaluating the reference", force=True)
        theirs = cached(manifest["id"], "base", None)
        references[concept] = {"model": manifest["id"], "accuracy": theirs["accuracy"],
                               "gap": {c: round(after["accuracy"][c] - v, 4)
                                       for c, v in theirs["accuracy"].items()
                                       if after["accuracy"].get(c) is not None
                                       and v is not None}}
    return {"before": before, "after": after, "negative_prompt": negative_baseline,
            "erased": concepts, "references": references}


def _save_checkpoint(trainer: Any, drift: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(trainer.checkpoint() | {"drift": drift}, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint whole
    # In shared storage a worker on another host resumes from it.
    jobfiles.share(get_context().settings, path)


def _publish(registry: Registry, name: str, given: bool, manifest: dict,
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


def _edit_record(spec: EraseJob, prompts: tuple) -> dict[str, Any]:
    """What the edited model's manifest says of how it was made."""
    edit = spec.model_dump(include={
        "method", "concepts", "iterations", "learning_rate", "negative_guidance",
        "erase_from", "seed", "ddim_steps", "start_guidance", "train_prompts", "preserve",
        "preserve_weight", "concept_kind", "preserve_prompts", "parameterization", "robust",
        "anchor", "anchor_concept", "reference"})
    if spec.parameterization == "lora":
        edit["lora_rank"] = spec.lora_rank
    edit["prompts"] = [{"prompt": p.prompt, "anchor": p.anchor}
                       | ({"preserve": p.preserve} if p.preserve else {})
                       for p in dict.fromkeys(prompts)]
    return edit | {"algorithm": "ESD (Gandikota et al., ICCV 2023)"}


def esd_trainer(ctx: WorkerContext, spec: EraseJob, pipe: Any) -> Any:
    """The trainer an erase job runs: ``spec``'s settings (``esd_config``) on ``pipe``, taught
    by the model retrained without the concept for anchor "reference". bench.attacks trains
    each method through it."""
    from worker.esd import ESDTrainer

    return ESDTrainer(pipe, esd_config(spec), reference=ctx.cache.get(spec.reference)[0]
                      if spec.reference else None)


def esd_config(spec: EraseJob) -> Any:
    """How an erase job trains: ``spec``'s ESD settings and prompts, with the job's
    sampling (``worker.esd.JOB_SAMPLING``). bench.attacks trains each method through it."""
    from worker.esd import JOB_SAMPLING, ESDConfig
    from worker.prompts import training_prompts

    prompts = training_prompts(spec.concepts, spec.train_prompts, spec.domain,
                               preserve=spec.preserve, kind=spec.concept_kind,
                               preserve_prompts=spec.preserve_prompts, anchor=spec.anchor,
                               anchor_concept=spec.anchor_concept)
    return ESDConfig(
        concepts=tuple(spec.concepts), prompts=prompts, method=spec.method,
        iterations=spec.iterations, learning_rate=spec.learning_rate,
        negative_guidance=spec.negative_guidance, preserve_weight=spec.preserve_weight,
        erase_from=spec.erase_from, ddim_steps=spec.ddim_steps,
        start_guidance=spec.start_guidance, seed=spec.seed, height=spec.height,
        width=spec.width, parameterization=spec.parameterization, lora_rank=spec.lora_rank,
        robust=spec.robust, block=JOB_SAMPLING["block"],
        stops_per_trajectory=JOB_SAMPLING["stops_per_trajectory"])


@job_function(EraseJob)
def erase(spec: EraseJob, reporter: Reporter) -> dict:
    """ESD fine-tune of ``base_model`` that writes model ``name`` (a UNet delta)."""
    from worker.domains import get_domain
    from worker.evidence import Drawing
    from worker.variants import build_variant

    ctx = get_context()
    this = job_id()
    registry = ctx.registry
    base_manifest = registry.get(spec.base_model)
    if registry.exists(spec.name) and spec.name_given:
        raise ModelExists(f"`name` {spec.name!r} is taken: a model with that id exists")
    total = spec.iterations
    reporter.progress(0, total, "loading", force=True)
    pipe, _ = ctx.cache.get(spec.base_model)
    trainer = esd_trainer(ctx, spec, pipe)
    prompts = trainer.cfg.prompts
    ckpt = jobfiles.checkpoint_path(ctx.settings, this)
    resumed_from = None
    drift: list[dict] = []  # the neighbours' drift at each check during training
    if jobfiles.fetch(ctx.settings, ckpt):  # this host's, or another's from shared storage
        saved = torch.load(ckpt, weights_only=False)
        trainer.restore(saved)
        drift = list(saved.get("drift") or [])
        resumed_from = trainer.state.iteration
        reporter.set_meta(resumed_from=resumed_from)
        log.info("job %s resumes at iteration %d", this, trainer.state.iteration)
    # The base's drawings of the evidence rows, made once: each drift check draws only the
    # neighbour rows again, with the model as trained so far.
    reporter.progress(trainer.state.iteration, total, "drawing the base", force=True)
    drawing = Drawing(pipe, get_domain(spec.domain), list(spec.concepts),
                      guidance=spec.draw_guidance, steps=spec.draw_steps,
                      size=(spec.height, spec.width), seed=spec.seed, kind=spec.concept_kind,
                      preserve_prompts=spec.preserve_prompts)
    checks = set(drift_points(total, spec.drift_checks)) if drawing.kept else set()
    every = max(1, ctx.settings.checkpoint_every)
    t0 = time.perf_counter()

    def on_step(i: int, loss: float) -> None:
        reporter.check()
        recent = trainer.state.losses[-20:]
        shown = {"loss": round(sum(recent) / len(recent), 6)} | (
            {"drift": drift[-1]} if drift else {})  # the latest check's
        reporter.progress(i, total, "training", force=i in checks, **shown)
        if i in checks:
            moved = drawing.drift(build_variant(pipe, trainer.delta(), spec.base_model).pipe)
            assert moved is not None  # there are neighbour rows
            drift.append({"iteration": i, "psnr": moved["psnr"], "ssim": moved["ssim"]})
            reporter.progress(i, total, "training", force=True, **shown | {"drift": drift[-1]})
            log.info("job %s: neighbours' drift at %d: PSNR %s, SSIM %s", this, i,
                     moved["psnr"], moved["ssim"])
        if i % every == 0 and i < total:
            _save_checkpoint(trainer, drift, ckpt)

    trainer.train(on_step)
    train_s = time.perf_counter() - t0
    current = get_current_job()
    if current is not None and total > (resumed_from or 0):
        metrics.safely(metrics.esd_trained, current.connection, total - (resumed_from or 0),
                       train_s)
    reporter.progress(total, total, "saving", force=True)
    losses = trainer.state.losses
    delta = trainer.delta()
    # The edit as it will be served, built once for the report, the evidence and the attacks.
    edited = build_variant(pipe, delta, spec.base_model).pipe
    manifest: dict[str, Any] = {
        "kind": "text-to-image", "format": "delta",
        "base": {"id": spec.base_model, "digest": base_manifest["digest"]},
        **owned(spec.visibility),
        "edit": _edit_record(spec, prompts),
        "training": {"loss_first": losses[0] if losses else None,
                     "loss_last20": sum(losses[-20:]) / max(1, len(losses[-20:])),
                     "seconds": round(train_s, 1), "job": this},
        "defaults": base_manifest.get("defaults"), "limits": base_manifest.get("limits"),
        # An edit draws the same domain: it is measured the same way (POST /evaluate).
        "domain": base_manifest.get("domain"), "evaluator": base_manifest.get("evaluator"),
    }
    if spec.evaluate and spec.evaluator:
        manifest["metrics"] = {
            "erasure": _evaluate_erasure(ctx, spec, edited, reporter)}
    grid_entry, manifest["evidence"] = _erase_evidence(ctx, spec, pipe, edited, drawing, this,
                                                       reporter)
    final = manifest["evidence"]["drift"]
    if final is not None:
        drift.append({"iteration": total, "psnr": final["psnr"], "ssim": final["ssim"]})
    manifest["training"]["drift"] = drift
    if spec.attack is not None:
        manifest["attacks"] = _attack(ctx, spec, pipe, edited, delta, reporter)
    name = _publish(registry, spec.name, spec.name_given, manifest, delta)
    jobfiles.drop_checkpoint(ctx.settings, this)
    reporter.progress(total, total, "done", force=True)
    return {"model": name, "base": spec.base_model, "links": {"model": f"/models/{name}"},
            "iterations": total, "loss_last20": manifest["training"]["loss_last20"],
            "resumed_from": resumed_from, "images": [grid_entry],
            "evidence": manifest["evidence"], "drift": drift,
            **({"attacks": manifest["attacks"]} if spec.attack is not None else {})}


def _attack(ctx: WorkerContext, spec: EraseJob, pipe: Any, edited: Any,
            delta: dict[str, torch.Tensor], reporter: Reporter) -> list[dict]:
    """The attacks asked for on the new edit, the base as the control (worker.attacks), and
    the gap to the base's reference without each concept (worker.reference)."""
    from worker.attacks import Drawing, attack_concepts
    from worker.esd import full_delta
    from worker.reference import References

    assert spec.attack is not None
    return attack_concepts(pipe, edited, spec.attack, spec.domain,
                           ctx.judge_model(spec.evaluator),
                           Drawing(spec.draw_guidance, spec.draw_steps, spec.height, spec.width),
                           sorted(full_delta(pipe.unet, delta)), spec.concept_kind, reporter,
                           References.in_context(ctx, spec.base_model))


def _erase_evidence(ctx: WorkerContext, spec: EraseJob, pipe: Any, edited: Any,
                    drawing: Any, this: str, reporter: Reporter) -> tuple[dict, dict]:
    """The comparison grid (stored as the job's image 0) and its report, for every erase."""
    from worker.domains import get_domain
    from worker.evidence import evidence

    reporter.progress(0, 1, "evidence", force=True)
    clip = ctx.clip()
    grid, report = evidence(
        pipe, edited, get_domain(spec.domain), list(spec.concepts),
        guidance=spec.draw_guidance, steps=spec.draw_steps, size=(spec.height, spec.width),
        seed=spec.seed, check=reporter.check, kind=spec.concept_kind,
        preserve_prompts=spec.preserve_prompts, clip=clip, drawing=drawing)
    save_png(grid, jobfiles.output_dir(ctx.settings, this) / "grid.png")
    entry = image_entry(this, 0, "grid.png", grid, spec.seed, role="grid")
    return entry, report | {"grid": entry["url"], "job": this}
