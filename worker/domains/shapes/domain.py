"""The shapes family as a domain: its prompt sets, neighbours, judge and erasure report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.domains.shapes import erasure
from worker.domains.shapes.judge import ShapesJudge, references
from worker.domains.shapes.render import COLORS, SHAPES

# The trained family ships inside the package (models/<id>/ beside this file).
DEMO_DIR = Path(__file__).parent / "models"
_DEMO_SOURCE = ("trained by `lethe train shapes` (worker/domains/shapes/train.py); see "
                "worker/domains/shapes/models")
# The other methods as measured with the paper's preservation weight.
PLAIN = {"preserve_weight": 1.0}
DEMO_MANIFESTS: dict[str, dict] = {
    "shapes-sd": {
        "kind": "text-to-image", "format": "diffusers", "pipeline": "StableDiffusionPipeline",
        "base": None, "source": _DEMO_SOURCE,
        "defaults": {"steps": 30, "guidance_scale": 4.0, "width": 32, "height": 32,
                     "scheduler": "ddim"},
        "limits": {"max_side": 128},
        "evaluator": "shapes-clf",
        "domain": "shapes",
        # Found by experiment (python -m worker.domains.shapes.erase_study; numbers in the
        # model card): a colour needs 600 iterations at 5e-4 to spare its neighbours
        # (orange); training only the cross-attention's keys and values (esd-x-strict)
        # leaves the neighbours' same-seed drawings far closer to the base's than all of
        # the cross-attention (esd-x), and η = 2 erases red wholly at that step; esd-u
        # trains every other weight and needs 1e-4. Preservation weight 2 keeps the
        # neighbours' drawings closest to the base's. Not robust by default: robust
        # training holds the attacks on triangle but damages every other drawing (circles
        # come out as lumpy diamonds: kept-prompt FID 209 against the base's 87), and does
        # not hold red; `"robust": true` asks for it (model card, bench.attacks). ESD's
        # anchor by default: robust esd-all steered to a neighbour ("anchor": "neighbour")
        # holds triangle with far cleaner drawings but breaks circle, square and red.
        "erase_defaults": {"method": "esd-x-strict", "negative_guidance": 2.0,
                           "iterations": 600, "learning_rate": 5e-4, "ddim_steps": 30,
                           "start_guidance": 3.0, "preserve_weight": 2.0,
                           # The other methods as measured before, with the paper's η.
                           "by_method": {"esd-x": {"negative_guidance": 1.0, **PLAIN},
                                         "esd-u": {"learning_rate": 1e-4, "iterations": 200,
                                                   "negative_guidance": 1.0, **PLAIN},
                                         "esd-all": {"learning_rate": 1e-4, "iterations": 200,
                                                     "negative_guidance": 1.0, **PLAIN}},
                           # Trained as LoRA (rank 4): the factors start from zero and
                           # need a larger step; 2e-3 erases triangle wholly (model card).
                           "by_parameterization": {"lora": {"learning_rate": 2e-3,
                                                             **PLAIN}}},
    },
    "shapes-x4": {
        "kind": "upscaler", "format": "diffusers", "pipeline": "StableDiffusionUpscalePipeline",
        "base": None, "source": _DEMO_SOURCE,
        # One step from t = 999 returns the model's estimate of the posterior mean: the
        # best PSNR (see its quality report); more steps sample sharper, less exact detail.
        "defaults": {"steps": 1, "guidance_scale": 0.0, "noise_level": 0},
    },
    "shapes-clf": {
        "kind": "classifier", "format": "shapes-classifier", "class": "ShapesClassifier",
        "domain": "shapes", "base": None, "source": _DEMO_SOURCE,
    },
}

# The named prompt sets and how many prompts each holds (DESIGN.md's prompt forms).
PROMPT_SETS = {"shapes-color": 24, "shapes-full": 72, "shapes-shape": 4}


class ShapesDomain:
    name = "shapes"
    report_protocol = erasure.PROTOCOL

    def info(self) -> dict[str, Any]:
        return {"prompt_sets": PROMPT_SETS, "default_prompt_set": "shapes-color",
                "default_metrics": ["fid", "precision_recall", "attribute_score", "accuracy"],
                "judge_metrics": ["attribute_score", "accuracy"], "reference": "render",
                "preserve": True}

    def prompt_set(self, name: str) -> list[str]:
        if name == "shapes-shape":
            return [f"a {s}" for s in SHAPES]
        form = {"shapes-color": "color", "shapes-full": "full"}[name]
        return [p for p, _, _ in erasure.concept_prompts("", form)]

    def training_texts(self, concept: str, kind: str | None = None) -> list[str]:
        """Every prompt form that names ``concept``; a word outside the domain gets the
        generic phrasings."""
        if concept not in SHAPES and concept not in COLORS:
            from worker.domains import get_domain

            return get_domain("generic").training_texts(concept, kind)
        prompts = [concept]
        if concept in SHAPES:
            prompts.append(f"a {concept}")
        prompts += [p for p, _, _ in erasure.concept_prompts(concept, "color")]
        prompts += [p for p, _, _ in erasure.concept_prompts(concept, "full")]
        return prompts

    def neighbours(self, concept: str, erased: list[str], kind: str | None = None
                   ) -> list[str]:
        family = SHAPES if concept in SHAPES else tuple(COLORS) if concept in COLORS else ()
        return [c for c in family if c != concept and c not in erased]

    def judge(self, classifier: Any, kind: str | None = None) -> ShapesJudge | None:
        return ShapesJudge(classifier) if classifier is not None else None

    def references(self, prompts: list[str], seed: int, side: int) -> np.ndarray:
        return references(prompts, seed, side=side)

    def load_classifier(self, path: Any, device: Any) -> Any:
        from worker.domains.shapes.classifier import ShapesClassifier

        return ShapesClassifier.from_pretrained(path, torch_dtype=torch.float32
                                                ).to(device).eval()

    def erasure_report(self, pipe: Any, classifier: Any, erased: list[str], per_prompt: int,
                       guidance: float, negative_prompt: str | None = None
                       ) -> dict[str, Any]:
        return erasure.erasure_report(pipe, classifier, erased, per_prompt, guidance,
                                      negative_prompt=negative_prompt)

    def train(self, out: Path, seed: int = 0, threads: int = 0, scale: float = 1.0
              ) -> dict[str, Path]:
        """``lethe train shapes``: the family from scratch (``scale`` < 1 for a smoke run)."""
        from worker.domains.shapes.train import DemoConfig, train_demo

        cfg = DemoConfig(seed=seed, threads=threads)
        return train_demo(out, cfg.scaled(scale) if scale != 1.0 else cfg)

    retrains = "shapes-sd"  # the model train_without makes a reference of

    def train_without(self, concept: str, seed: int = 0, threads: int = 0, scale: float = 1.0,
                      log: Any = print) -> tuple[str, Any, dict[str, Any]]:
        """``lethe train shapes --without CONCEPT``: ``shapes-sd``'s recipe with every scene
        of ``concept`` dropped, on its shipped VAE and tokenizer (``retrained``); the base's
        id, the pipeline, and the manifest it is served with (the base's own, less its
        source)."""
        from diffusers import StableDiffusionPipeline

        from worker.domains.shapes.retrained import MODEL, retrain

        if concept not in SHAPES and concept not in COLORS:
            raise ValueError(f"`--without` must be a shape {list(SHAPES)} or a colour "
                             f"{list(COLORS)}, got {concept!r}")
        from worker.domains.shapes.train import DemoConfig

        shipped = StableDiffusionPipeline.from_pretrained(
            DEMO_DIR / MODEL, torch_dtype=torch.float32, safety_checker=None,
            requires_safety_checker=False)
        cfg = DemoConfig(seed=seed, threads=threads, n_hires=16)  # 128 px: the upscaler's
        pipe = retrain(shipped, concept, cfg.scaled(scale) if scale != 1.0 else cfg, log)
        return MODEL, pipe, {k: v for k, v in DEMO_MANIFESTS[MODEL].items() if k != "source"}

    def shipped(self) -> dict[str, tuple[Path, dict[str, Any]]]:
        """The trained models in this package, with their manifests, for first start."""
        quality = DEMO_DIR / "quality.json"
        metrics = json.loads(quality.read_text()) if quality.is_file() else None
        return {model_id: (DEMO_DIR / model_id,
                           {**manifest, "metrics": metrics} if metrics else manifest)
                for model_id, manifest in DEMO_MANIFESTS.items()}
