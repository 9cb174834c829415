"""What an erase shows: the same seeds drawn before and after, side by side, and how far the
concepts it should have kept moved.

ESD users judge an erasure first by looking at same-seed images before and after. Every
erase job draws a comparison grid: rows are prompts of the erased concepts, then prompts of
their neighbours (the concepts the model's domain says the edit should keep); columns are
the base, the edit, and the two inference-time alternatives the ESD paper measures itself
against: the concepts as a negative prompt, and Safe Latent Diffusion (Schramowski et al.,
CVPR 2023) with the concepts as its unsafe concept. A row uses one seed in every column.

Same-seed drift is the judge-free measure of collateral damage: PSNR and SSIM between the
base's and the edit's images of the neighbour prompts drawn with equal seeds. A lenient
classifier can call a circle drawn with a dark outline a circle; drift sees the outline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from worker.metrics import psnr, ssim
from worker.prompts import replace, without
from worker.sampling import generate

COLUMNS = ("base", "edit", "negative_prompt", "sld")
# SLD's "medium" configuration from its paper (warm-up given for 50 steps; scaled).
SLD_MEDIUM = {"sld_guidance_scale": 1000.0, "sld_threshold": 0.01, "sld_momentum_scale": 0.3,
              "sld_mom_beta": 0.4}
SLD_WARMUP_OF_50 = 7
DRIFT_SEEDS = 4  # seeds per neighbour prompt in the drift measure
TILE = 128  # least pixels a side of a grid cell (small images are enlarged, nearest)


def grid_rows(domain: Any, concepts: list[str], per_concept: int = 2, neighbours: int = 2,
              kind: str | None = None, preserve_prompts: list[str] | None = None
              ) -> list[tuple[str, str]]:
    """(kind, prompt) rows: ``per_concept`` prompts naming each erased concept, then the
    first of them with a neighbour in its place, for up to ``neighbours`` neighbours (or
    the request's first ``preserve_prompts``)."""
    rows: list[tuple[str, str]] = []
    for c in concepts:
        texts = [t for t in domain.training_texts(c, kind) if t != c][:per_concept] or [c]
        rows += [("erased", t) for t in texts]
        if preserve_prompts:
            continue
        for n in domain.neighbours(c, concepts, kind)[:neighbours]:
            kept = replace(texts[0], c, n)
            if kept is not None:
                rows.append(("neighbour", kept))
    rows += [("neighbour", p) for p in (preserve_prompts or [])[:neighbours]]
    return rows


def _sld_images(base: Any, prompts: list[str], seeds: list[int], concepts: list[str],
                guidance: float, steps: int, size: tuple[int, int]) -> np.ndarray:
    from diffusers import DDIMScheduler, StableDiffusionPipelineSafe

    c = base.components
    safe = StableDiffusionPipelineSafe(
        vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
        scheduler=DDIMScheduler.from_config(base.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    safe.set_progress_bar_config(disable=True)
    safe.safety_concept = ", ".join(concepts)
    out = []
    # One prompt a call: the pipeline tokenizes a batch untruncated as one tensor, which
    # fails when its prompts run past the tokenizer's length by different amounts.
    for prompt, seed in zip(prompts, seeds, strict=True):
        with torch.inference_mode():
            out.append(safe(prompt, height=size[0], width=size[1], num_inference_steps=steps,
                            guidance_scale=guidance, output_type="np",
                            generator=torch.Generator("cpu").manual_seed(seed),
                            sld_warmup_steps=max(1, steps * SLD_WARMUP_OF_50 // 50),
                            **SLD_MEDIUM).images[0])
    return (np.stack(out) * 255).round().astype(np.uint8)


def grid_image(columns: list[np.ndarray]) -> Image.Image:
    """One PNG: rows × columns cells, each column's images top to bottom."""
    rows, h, w = columns[0].shape[:3]
    scale = max(1, TILE // max(h, w))
    sheet = np.concatenate([np.concatenate(list(col), axis=0) for col in columns], axis=1)
    image = Image.fromarray(sheet)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def drift_of(before: np.ndarray, after: np.ndarray, prompts: list[str]) -> dict[str, Any]:
    """PSNR and SSIM between two same-seed drawings of ``prompts`` (uint8 N×H×W×3)."""
    b, a = torch.from_numpy(before), torch.from_numpy(after)
    db = psnr(b, a)  # inf when nothing moved: JSON has no infinity
    return {"prompts": prompts, "seeds_per_prompt": DRIFT_SEEDS,
            "psnr": round(db, 3) if db != float("inf") else None,
            "identical": db == float("inf"), "ssim": round(ssim(b, a), 4)}


class Drawing:
    """The evidence's prompts drawn by the base once, each row with ``DRIFT_SEEDS`` seeds;
    ``drift(edited)`` draws the neighbour rows again with the same seeds and measures how far
    they moved. An erase job asks it during training too (``drift_checks``), which costs
    only the neighbour rows each time."""

    def __init__(self, base: Any, domain: Any, concepts: list[str], guidance: float,
                 steps: int, size: tuple[int, int], seed: int = 0, kind: str | None = None,
                 preserve_prompts: list[str] | None = None):
        self.guidance, self.steps, self.size = guidance, steps, size
        self.rows = grid_rows(domain, concepts, kind=kind, preserve_prompts=preserve_prompts)
        self.prompts = [p for _, p in self.rows]
        self.drawn = [p for p in self.prompts for _ in range(DRIFT_SEEDS)]
        self.drawn_seeds = [seed + j for j in range(len(self.drawn))]
        self.seeds = self.drawn_seeds[::DRIFT_SEEDS]  # each row's first: the grid's cells
        self.kept = [p for kind, p in self.rows if kind == "neighbour"]
        self.near = np.array([p in self.kept for p in self.drawn])
        self.before = self.draw(base)

    def draw(self, pipe: Any, rows: np.ndarray | None = None) -> np.ndarray:
        pick = np.ones(len(self.drawn), bool) if rows is None else rows
        prompts = [p for p, keep in zip(self.drawn, pick, strict=True) if keep]
        seeds = [s for s, keep in zip(self.drawn_seeds, pick, strict=True) if keep]
        return generate(pipe, prompts, seeds, self.guidance, steps=self.steps, size=self.size)

    def drift(self, edited: Any) -> dict[str, Any] | None:
        """The neighbour rows' same-seed drift from the base to ``edited``; None when the
        domain names no neighbours."""
        if not self.kept:
            return None
        return drift_of(self.before[self.near], self.draw(edited, self.near), self.kept)


def evidence(base: Any, edited: Any, domain: Any, concepts: list[str], guidance: float,
             steps: int, size: tuple[int, int], seed: int = 0,
             check: Callable[[], None] = lambda: None, kind: str | None = None,
             preserve_prompts: list[str] | None = None, clip: Any = None,
             drawing: Drawing | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """The comparison grid and the report that goes with it (rows, columns, drift, and
    CLIP zero-shot scores when ``clip``, a ``worker.features.ClipScorer``, is given).
    ``check`` runs between the drawings and may raise to stop (a cancel); ``drawing`` is the
    base's, when the caller made it already (for the checks during training)."""
    d = drawing or Drawing(base, domain, concepts, guidance, steps, size, seed, kind,
                           preserve_prompts)
    check()
    before, after = d.before, d.draw(edited)
    check()
    negative = generate(base, d.prompts, d.seeds, guidance, steps=steps, size=size,
                        negative_prompt=", ".join(concepts))
    check()
    columns = [before[::DRIFT_SEEDS], after[::DRIFT_SEEDS], negative]
    # diffusers' Safe Latent Diffusion is a Stable Diffusion 1.x/2.x pipeline: SDXL's grid
    # goes without that column, and says so.
    has_sld = getattr(base, "text_encoder_2", None) is None
    if has_sld:
        columns.append(_sld_images(base, d.prompts, d.seeds, concepts, guidance, steps, size))
    drift = drift_of(before[d.near], after[d.near], d.kept) if d.kept else None
    report = {"rows": [{"kind": k, "prompt": p, "seed": s}
                       for (k, p), s in zip(d.rows, d.seeds, strict=True)],
              "columns": list(COLUMNS[:len(columns)]), "drift": drift,
              "columns_note": None if has_sld else "no Safe Latent Diffusion column: "
              "diffusers has it for Stable Diffusion 1.x and 2.x only",
              "drift_note": None if drift else "the model's domain names no neighbours of "
              "these concepts: no same-seed drift"}
    if clip is None:
        report["clip"] = None
        report["clip_note"] = ("set LETHE_CLIP_MODEL_PATH to a local CLIP folder to add CLIP "
                               "zero-shot scores before and after")
    else:
        report["clip"] = clip_wins(clip, d.rows, concepts, d.drawn, before, after)
    return grid_image(columns), report


def clip_wins(clip: Any, rows: list[tuple[str, str]], concepts: list[str],
              drawn: list[str], before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    """How often CLIP matches an image to its prompt rather than to the prompt without the
    row's concept (erased rows: the erased concept; neighbour rows: the concept held),
    before and after, over the erased rows and over the neighbour rows."""
    out: dict[str, Any] = {}
    for kind in ("erased", "neighbour"):
        prompts = {p for k, p in rows if k == kind}
        pick = [i for i, p in enumerate(drawn) if p in prompts]
        if not pick:
            out[kind] = None
            continue
        texts = [drawn[i] for i in pick]
        anchors = [without(t, concepts) if kind == "erased" else _anchor(t, rows)
                   for t in texts]
        scores = {}
        for when, images in (("before", before), ("after", after)):
            img, with_concept = clip.embeddings(images[pick], texts)
            _, without_concept = clip.embeddings(images[pick], anchors)
            wins = (img * with_concept).sum(1) > (img * without_concept).sum(1)
            scores[when] = round(float(wins.float().mean()), 4)
        out[kind] = scores | {"images": len(pick)}
    return out


def _anchor(prompt: str, rows: list[tuple[str, str]]) -> str:
    """A neighbour row's prompt without its neighbour: the words it does not share with
    the first erased row (whose concept it replaced)."""
    first = next(p for k, p in rows if k == "erased").split()
    return " ".join(w for w in prompt.split() if w in first)
