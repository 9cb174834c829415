"""The shapes domain's measuring stick: what a prompt asks for, what an image shows, and the
"real images" a prompt stands for.

``shapes-clf`` plays three parts here. Its verdicts give accuracy (the ESD paper's
erased-class accuracy); its probability of the prompted attributes stands in for CLIP
score; its penultimate features stand in for Inception features in FID and
precision/recall. References are renders of scenes that match each prompt, drawn from the
seeded renderer, so a model is compared with the distribution it was trained to draw.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from worker.domains.shapes.classifier import to_tensor
from worker.domains.shapes.geometry import looks_like
from worker.domains.shapes.render import BACKGROUNDS, COLORS, SHAPES, render, sample_scene

KINDS = {"shape": SHAPES, "color": tuple(COLORS), "background": tuple(BACKGROUNDS)}


def attributes(prompt: str) -> dict[str, str]:
    """The domain words a prompt names, by kind ("a red circle" → shape circle, colour red).
    A background word counts only in "on a … background"."""
    words = prompt.lower().split()
    found: dict[str, str] = {}
    for i, w in enumerate(words):
        if w in SHAPES:
            found.setdefault("shape", w)
        elif w in COLORS:
            found.setdefault("color", w)
        elif w in BACKGROUNDS and words[i + 1:i + 2] == ["background"]:
            found.setdefault("background", w)
    return found


def references(prompts: list[str], seed: int, side: int = 32) -> np.ndarray:
    """One render per prompt (uint8 N×side×side×3): a random scene with the prompt's
    attributes, the rest drawn at random; same seed, same images."""
    rng = np.random.default_rng(seed)
    return np.stack([render(sample_scene(rng, **attributes(p)), side) for p in prompts])


class ShapesJudge:
    """``shapes-clf`` as a feature extractor and a judge of prompt adherence."""

    name = "shapes-clf"

    def __init__(self, clf: Any, batch: int = 256):
        self.clf, self.batch = clf.eval(), batch

    @torch.inference_mode()
    def _outputs(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        parts = [self.clf(to_tensor(images[i:i + self.batch]).to(self.clf.device,
                                                                  self.clf.dtype))
                 for i in range(0, len(images), self.batch)]
        return {k: torch.cat([p[k] for p in parts]).float().cpu() for k in parts[0]}

    def features(self, images: np.ndarray) -> torch.Tensor:
        """Penultimate features, N×D."""
        return self._outputs(images)["features"]

    def judge(self, images: np.ndarray, prompts: list[str]) -> dict[str, Any]:
        """Per kind, whether each image shows what its prompt names (None: not named), and
        the attribute score: the classifier's mean probability of the prompted attributes."""
        out = self._outputs(images)
        asked = [attributes(p) for p in prompts]
        hits: dict[str, list[bool | None]] = {}
        probs: list[float] = []
        for kind, names in KINDS.items():
            p = out[kind].softmax(-1)
            pred = p.argmax(-1).tolist()
            hits[kind] = [names[pred[i]] == a[kind] if kind in a else None
                          for i, a in enumerate(asked)]
            probs += [float(p[i, names.index(a[kind])]) for i, a in enumerate(asked) if kind in a]
        return {"hits": hits, "attribute_score": float(np.mean(probs)) if probs else None}

    def confirms(self, concept: str) -> bool:
        """Whether ``confirm`` has an opinion on ``concept``: shapes, not colours or
        backgrounds (which the classifier judges alone)."""
        return concept in SHAPES

    def confirm(self, images: np.ndarray, concept: str) -> list[bool] | None:
        """A second, model-free opinion on whether each image shows ``concept``: its
        outline's geometry (``geometry.looks_like``); None where it has none."""
        if not self.confirms(concept):
            return None
        return [looks_like(image, concept) for image in images]
