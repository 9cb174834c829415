"""The evaluate job: draw a model's images and measure them; the report goes to the
model's manifest (``worker.evaluation`` does the measuring)."""

from __future__ import annotations

import json
import time
from typing import Any

from app import jobfiles
from app.jobspecs import EvaluateJob
from app.registry import utcnow
from worker.context import get_context
from worker.jobs.base import job_function, job_id
from worker.progress import Reporter


@job_function(EvaluateJob)
def evaluate(spec: EvaluateJob, reporter: Reporter) -> dict:
    from worker.evaluation import evaluate as run_evaluation

    ctx = get_context()
    this = job_id()
    reporter.progress(0, 1, "loading", force=True)
    pipe, _ = ctx.cache.get(spec.model)
    clf = ctx.cache.get(spec.evaluator)[0] if spec.evaluator else None

    def on_progress(done: int, total: int, stage: str) -> None:
        reporter.check()
        reporter.progress(done, total, stage, force=stage != "drawing")

    t0 = time.perf_counter()
    clip = ctx.clip() if "clip_score" in spec.metrics else None
    report = run_evaluation(pipe, spec, clf=clf, settings=ctx.settings, clip=clip,
                            on_progress=on_progress)
    if spec.attack is not None:
        report["attacks"] = _attacks(spec, pipe, reporter)
    report |= {"job": this, "seconds": round(time.perf_counter() - t0, 1),
               "created_at": utcnow()}
    out = jobfiles.output_dir(ctx.settings, this)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    jobfiles.share(ctx.settings, out / "report.json")
    if spec.record:
        ctx.registry.add_report(spec.model, report)
    reporter.progress(1, 1, "done", force=True)
    return {"report": report, "links": {"model": f"/models/{spec.model}"}}


def _attacks(spec: EvaluateJob, pipe: Any, reporter: Reporter) -> list[dict]:
    """Each erased concept attacked on the model and on its base (``worker.attacks``), and
    on the base's reference retrained without it where there is one (``worker.reference``)."""
    from worker.attacks import Drawing, attack_concepts
    from worker.esd import full_delta
    from worker.reference import References
    from worker.variants import load_delta

    assert spec.attack is not None and spec.attack_base is not None
    ctx = get_context()
    base = ctx.cache.get(spec.attack_base)[0] if spec.attack_base != spec.model else pipe
    manifest = ctx.registry.get(spec.model)
    trained = (sorted(full_delta(base.unet, load_delta(ctx.registry.path(spec.model))))
               if manifest.get("format") == "delta" else [])
    return attack_concepts(base, pipe, spec.attack, spec.domain, ctx.judge_model(spec.evaluator),
                           Drawing(spec.guidance_scale, spec.steps, spec.height, spec.width),
                           trained, (manifest.get("edit") or {}).get("concept_kind"), reporter,
                           References.in_context(ctx, spec.attack_base))
