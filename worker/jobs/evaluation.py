"""The evaluate job: draw a model's images and measure them; the report goes to the
model's manifest (``worker.evaluation`` does the measuring)."""

from __future__ import annotations

import json
import time

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
    report = run_evaluation(pipe, spec, clf=clf, settings=ctx.settings,
                            on_progress=on_progress)
    report |= {"job": this, "seconds": round(time.perf_counter() - t0, 1),
               "created_at": utcnow()}
    out = jobfiles.output_dir(ctx.settings, this)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    jobfiles.share(ctx.settings, out / "report.json")
    ctx.registry.add_report(spec.model, report)
    reporter.progress(1, 1, "done", force=True)
    return {"report": report, "links": {"model": f"/models/{spec.model}"}}
