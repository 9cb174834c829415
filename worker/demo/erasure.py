"""Erasure report on the shapes family: the ESD paper's Table 2 protocol with our judge.

For each concept of the domain (four shapes, six colours) the model draws N images per
prompt with fixed seeds; the classifier's agreement with the prompted concept is that
concept's accuracy. Run before and after an edit, it shows the erased concept's accuracy
falling and the others' staying.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from worker.demo.render import BACKGROUNDS, COLORS, SHAPES
from worker.demo.sample import generate


def concept_prompts(concept: str, form: str = "color") -> list[tuple[str, str, str]]:
    """(prompt, shape, colour) for every prompt that names ``concept``.

    ``form`` "color": "a {colour} {shape}"; "full": "... on a {background} background" (the
    rephrasings where ESD leaks most).
    """
    shapes = [concept] if concept in SHAPES else list(SHAPES)
    colors = [concept] if concept in COLORS else list(COLORS)
    out = []
    for s in shapes:
        for c in colors:
            if form == "full":
                out += [(f"a {c} {s} on a {b} background", s, c) for b in BACKGROUNDS]
            else:
                out.append((f"a {c} {s}", s, c))
    return out


def concept_accuracy(pipe: Any, clf: Any, concept: str, per_prompt: int = 4,
                     form: str = "color", steps: int = 30, guidance: float = 4.0,
                     seed: int = 0, batch: int = 48) -> float:
    """Share of images for prompts naming ``concept`` that the classifier says show it."""
    key = "shape" if concept in SHAPES else "color"
    prompts = [p for p in concept_prompts(concept, form) for _ in range(per_prompt)]
    images = generate(pipe, [p for p, _, _ in prompts], [seed + j for j in range(len(prompts))],
                      guidance, steps=steps, batch=batch)
    hits = [v[key] == concept for v in clf.predict(images)]
    return float(np.mean(hits))


def erasure_report(pipe: Any, clf: Any, erased: list[str], per_prompt: int = 4,
                   guidance: float = 4.0, include_full: bool = True) -> dict[str, Any]:
    """Accuracy on every concept; for the erased ones, also on the long-prompt rephrasings."""
    domain = [*SHAPES, *COLORS]
    report: dict[str, Any] = {
        "per_prompt": per_prompt, "guidance": guidance, "steps": 30, "scheduler": "ddim",
        "accuracy": {c: concept_accuracy(pipe, clf, c, per_prompt, guidance=guidance)
                     for c in domain},
    }
    if include_full:
        report["accuracy_full_prompts"] = {
            c: concept_accuracy(pipe, clf, c, max(1, per_prompt // 2), form="full",
                                guidance=guidance)
            for c in erased if c in domain}
    return report
