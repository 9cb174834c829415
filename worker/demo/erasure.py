"""Erasure report on the shapes family: the ESD paper's Table 2 protocol with our judge.

For each concept of the domain (four shapes, six colours) the model draws N images per
prompt with fixed seeds; the classifier's agreement with the prompted concept is that
concept's accuracy. Run before and after an edit, it shows the erased concept's accuracy
falling and the others' staying.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from worker.demo.render import BACKGROUNDS, COLORS, SHAPES
from worker.pipelines import with_scheduler


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


@torch.inference_mode()
def concept_accuracy(pipe: Any, clf: Any, concept: str, per_prompt: int = 4,
                     form: str = "color", steps: int = 30, guidance: float = 4.0,
                     seed: int = 0, batch: int = 48) -> float:
    """Share of images for prompts naming ``concept`` that the classifier says show it."""
    key = "shape" if concept in SHAPES else "color"
    prompts = [p for p in concept_prompts(concept, form) for _ in range(per_prompt)]
    hits = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        images = with_scheduler(pipe, "ddim")(
            prompt=[p for p, _, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
            width=32, height=32, output_type="np",
            generator=[torch.Generator("cpu").manual_seed(seed + i + k)
                       for k in range(len(chunk))],
        ).images
        verdicts = clf.predict((images * 255).round().astype(np.uint8))
        hits += [v[key] == concept for v in verdicts]
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
