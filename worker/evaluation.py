"""An evaluation: draw a model's images for a set of prompts and measure them.

The API (``app.params.resolve_evaluate``) has already checked that every metric asked for
has what it needs; this module draws, extracts features and calls ``worker.metrics``.
A model's domain (``worker.domains``) supplies its named prompt sets, its judge (for
accuracy, attribute scores and the features of the ``render`` reference) and the renders;
other models are measured with the operator's Inception and CLIP files against a folder of
real images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from app.jobspecs import EvaluateJob
from worker.domains import get_domain
from worker.features import ClipScorer, InceptionFeatures, load_folder
from worker.metrics import fid, precision_recall
from worker.sampling import generate


def _batch(height: int, width: int) -> int:
    # 48 images of 32×32 at once; proportionally fewer as they grow (2 at 512×512).
    return max(1, min(48, 48 * 32 * 32 // (height * width)))


def evaluate(pipe: Any, params: EvaluateJob, *, clf: Any = None, settings: Any = None,
             clip: ClipScorer | None = None,
             on_progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Draw ``images_per_prompt`` images per prompt (image j with seed + j) and measure them.

    ``clip`` scores ``clip_score`` (a worker passes the one it keeps loaded; None: loaded
    from ``settings.clip_model_path`` for this call). ``on_progress(done, total, stage)``
    may raise to stop.
    """
    if not params.metrics:  # the attacks alone (worker.jobs.evaluation)
        return {"model": params.model, "images": 0, "metrics": {}}
    domain = get_domain(params.domain)
    # The API sets one of the two (app.params.resolve_evaluate).
    prompts = params.prompts or domain.prompt_set(params.prompt_set or "")
    per = params.images_per_prompt
    drawn = [p for p in prompts for _ in range(per)]
    seed, metrics = params.seed, set(params.metrics)
    size = (params.height, params.width)
    report: dict[str, Any] = {
        "model": params.model, "prompts": len(prompts),
        "prompt_set": params.prompt_set, "images_per_prompt": per,
        "images": len(drawn), "seed": seed, "steps": params.steps,
        "guidance_scale": params.guidance_scale,
        "negative_prompt": params.negative_prompt, "metrics": {},
    }

    def progress(done: int) -> None:
        if on_progress:
            on_progress(done, len(drawn), "drawing")

    images = generate(pipe, drawn, [seed + j for j in range(len(drawn))],
                      params.guidance_scale, steps=params.steps,
                      batch=_batch(*size), negative_prompt=params.negative_prompt,
                      size=size, on_batch=progress)
    if on_progress:
        on_progress(len(drawn), len(drawn), "measuring")
    out = report["metrics"]
    judge = domain.judge(clf)
    if judge and metrics & {"accuracy", "attribute_score"}:
        verdict = judge.judge(images, drawn)
        if "accuracy" in metrics:
            out["accuracy"] = {kind: float(np.mean([h for h in hits if h is not None]))
                               for kind, hits in verdict["hits"].items()
                               if any(h is not None for h in hits)}
        if "attribute_score" in metrics:
            out["attribute_score"] = verdict["attribute_score"]
    if metrics & {"fid", "precision_recall"}:
        if params.reference == "render":
            extractor: Any = judge  # the API allows "render" only with a judge
            real = domain.references(drawn, seed + 1, side=size[0])
        else:
            extractor = InceptionFeatures(settings.inception_path, pipe.device)
            real = load_folder(settings.references_dir / params.reference, size,
                               settings.max_eval_images)
        real_f, fake_f = extractor.features(real), extractor.features(images)
        report |= {"features": extractor.name, "reference": params.reference,
                   "reference_images": len(real)}
        if "fid" in metrics:
            out["fid"] = fid(real_f, fake_f)
            if params.reference == "render":
                # Two independent render sets of the same prompts: the FID a perfect model
                # would score at this sample size (FID is biased upward for small sets).
                out["fid_floor"] = fid(real_f, extractor.features(
                    domain.references(drawn, seed + 2, side=size[0])))
        if "precision_recall" in metrics:
            out["precision"], out["recall"] = precision_recall(real_f, fake_f)
    if "clip_score" in metrics:
        scorer = clip or ClipScorer(settings.clip_model_path, pipe.device)
        out["clip_score"] = scorer.score(images, drawn)
    return report
