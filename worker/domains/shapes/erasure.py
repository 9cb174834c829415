"""Erasure report on the shapes family: the ESD paper's Table 2 protocol with our judge.

For each concept of the domain (four shapes, six colours) the model draws N images per
prompt with fixed seeds; the classifier's agreement with the prompted concept is that
concept's accuracy. Run before and after an edit, it shows the erased concept's accuracy
falling and the others' staying, and FID / precision / recall on the untouched prompts
show whether their images kept their quality and their variety.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from worker.domains.shapes.judge import ShapesJudge, attributes, references
from worker.domains.shapes.render import BACKGROUNDS, COLORS, SHAPES
from worker.metrics import fid, precision_recall
from worker.sampling import generate


def concept_prompts(concept: str, form: str = "color") -> list[tuple[str, str, str]]:
    """(prompt, shape, colour) for every prompt that names ``concept``.

    ``form`` "color": "a {colour} {shape}"; "full": "... on a {background} background" (the
    rephrasings where ESD leaks most).
    """
    shapes = [concept] if concept in SHAPES else list(SHAPES)
    colors = [concept] if concept in COLORS else list(COLORS)  # "" gives every prompt
    out = []
    for s in shapes:
        for c in colors:
            if form == "full":
                out += [(f"a {c} {s} on a {b} background", s, c) for b in BACKGROUNDS]
            else:
                out.append((f"a {c} {s}", s, c))
    return out


def concept_accuracy(pipe: Any, clf: Any, concept: str, guidance: float, per_prompt: int = 4,
                     form: str = "color", steps: int = 30,
                     seed: int = 0, batch: int = 48, negative_prompt: str | None = None
                     ) -> float:
    """Share of images for prompts naming ``concept`` that the classifier says show it."""
    key = "shape" if concept in SHAPES else "color"
    prompts = [p for p in concept_prompts(concept, form) for _ in range(per_prompt)]
    images = generate(pipe, [p for p, _, _ in prompts], [seed + j for j in range(len(prompts))],
                      guidance, steps=steps, batch=batch, negative_prompt=negative_prompt)
    hits = [v[key] == concept for v in clf.predict(images)]
    return float(np.mean(hits))


# The layout of a report; a cached report of another protocol is measured again.
PROTOCOL = 2


def erasure_report(pipe: Any, clf: Any, erased: list[str], per_prompt: int,
                   guidance: float, include_full: bool = True,
                   negative_prompt: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Accuracy on every concept; for the erased ones, also on the long-prompt rephrasings;
    and FID / precision / recall against rendered references on the prompts that name no
    erased concept (what the edit should have left alone).

    Every "a {colour} {shape}" prompt is drawn ``per_prompt`` times once; a shape's accuracy
    and a colour's come from the same images. ``negative_prompt`` measures inference-time
    guidance away from a concept, the baseline fine-tuning is compared with.
    """
    judge = ShapesJudge(clf)
    prompts = [p for p, _, _ in concept_prompts("", "color") for _ in range(per_prompt)]
    images = generate(pipe, prompts, [seed + j for j in range(len(prompts))], guidance,
                      batch=48, negative_prompt=negative_prompt)
    hits = judge.judge(images, prompts)["hits"]
    asked = [attributes(p) for p in prompts]
    accuracy = {}
    for kind, concepts in (("shape", SHAPES), ("color", COLORS)):
        for c in concepts:
            mine = [h for h, a in zip(hits[kind], asked, strict=True) if a[kind] == c]
            accuracy[c] = float(np.mean(mine))
    report: dict[str, Any] = {
        "protocol": PROTOCOL, "per_prompt": per_prompt, "guidance": guidance, "steps": 30,
        "scheduler": "ddim", "negative_prompt": negative_prompt, "accuracy": accuracy,
    }
    kept = [i for i, a in enumerate(asked) if not set(a.values()) & set(erased)]
    if len(kept) > 3:
        kept_prompts = [prompts[i] for i in kept]
        real = judge.features(references(kept_prompts, seed + 1))
        fake = judge.features(images[kept])
        precision, recall = precision_recall(real, fake)
        report["kept_prompts"] = {
            "images": len(kept), "features": judge.name, "reference": "render",
            "fid": fid(real, fake), "precision": precision, "recall": recall,
            # A second render set against the first: a perfect model's FID at this size.
            "fid_floor": fid(real, judge.features(references(kept_prompts, seed + 2)))}
    if include_full:
        report["accuracy_full_prompts"] = {
            c: concept_accuracy(pipe, clf, c, guidance, max(1, per_prompt // 2), form="full",
                                negative_prompt=negative_prompt)
            for c in erased if c in SHAPES or c in COLORS}
    return report
