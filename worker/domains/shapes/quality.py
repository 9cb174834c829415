"""The "shapes" family's quality report: the numbers issue-level acceptance asks for.

    python -m worker.domains.shapes.quality [--out worker/domains/shapes/models] [--per-prompt 9]

Generation runs through the service's own path (registry -> the worker's pipeline cache ->
a per-request scheduler), as a job would. Writes QUALITY.md and contact_sheet.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionUpscalePipeline
from PIL import Image

from worker.context import get_context
from worker.defaults import ensure_default_models
from worker.domains.shapes.classifier import ShapesClassifier
from worker.domains.shapes.degrade import bicubic
from worker.domains.shapes.render import COLORS, SHAPES, render, sample_scene
from worker.sampling import generate

PROMPTS = [(c, s) for s in SHAPES for c in COLORS]  # the 24 colour×shape prompts


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def upscale(pipe: StableDiffusionUpscalePipeline, images: np.ndarray, prompts: list[str],
            seed: int = 0, steps: int = 1, noise_level: int = 0, batch: int = 20) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        with torch.inference_mode():
            up = pipe(prompt=prompts[i:i + batch],
                      image=[Image.fromarray(im) for im in images[i:i + batch]],
                      num_inference_steps=steps, guidance_scale=0.0, noise_level=noise_level,
                      output_type="np",
                      generator=torch.Generator("cpu").manual_seed(seed + i)).images
        out.append((up * 255).round().astype(np.uint8))
    return np.concatenate(out)


def downsample(images: np.ndarray, side: int = 32) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BOX))
                     for im in images])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).parent / "models"))
    parser.add_argument("--per-prompt", type=int, default=9)
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.0, 4.0, 7.5])
    parser.add_argument("--n-upscale", type=int, default=200)
    args = parser.parse_args()
    out = Path(args.out)
    t0 = time.monotonic()
    ctx = get_context()
    ensure_default_models(ctx.registry)
    clf = ShapesClassifier.from_pretrained(ctx.registry.path("shapes-clf"),
                                           torch_dtype=torch.float32).eval()
    report: dict = {"device": str(ctx.runtime.device), "torch": torch.__version__}

    # 1. The judge on fresh renders (a seed no training run used).
    rng = np.random.default_rng(1234)
    scenes = [sample_scene(rng) for _ in range(2000)]
    verdicts = clf.predict(np.stack([render(s, 32) for s in scenes]))
    report["classifier_heldout"] = {
        k: float(np.mean([v[k] == getattr(s, k) for v, s in zip(verdicts, scenes, strict=True)]))
        for k in ("shape", "color", "background")} | {"n": len(scenes)}

    print(report, flush=True)

    # 2. Prompt adherence of shapes-sd, through the worker's cache, at each guidance.
    pipe, _ = ctx.cache.get("shapes-sd")
    prompts = [f"a {c} {s}" for c, s in PROMPTS for _ in range(args.per_prompt)]
    labels = [(c, s) for c, s in PROMPTS for _ in range(args.per_prompt)]
    seeds = [1000 + i for i in range(len(prompts))]
    adherence, samples = {}, {}
    for g in args.guidance:
        images = generate(pipe, prompts, seeds, g)
        v = clf.predict(images)
        adherence[g] = {
            "shape": float(np.mean([x["shape"] == s for x, (_, s) in zip(v, labels, strict=True)])),
            "color": float(np.mean([x["color"] == c for x, (c, _) in zip(v, labels, strict=True)])),
        }
        samples[g] = images
        print(f"guidance {g}: {adherence[g]}", flush=True)
    # Ties go to the guidance the manifest ships with.
    shipped = ctx.registry.get("shapes-sd")["defaults"]["guidance_scale"]
    best = max(adherence, key=lambda g: (adherence[g]["shape"] + adherence[g]["color"],
                                         g == shipped))
    report["generation"] = {"n": len(prompts), "steps": 30, "scheduler": "ddim",
                            "by_guidance": {str(g): a for g, a in adherence.items()},
                            "chosen_guidance": best}

    # 3. shapes-x4 against bicubic on held-out 128×128 renders, downsampled ×4 (bicubic).
    x4 = ctx.cache.get("shapes-x4")[0]
    rng = np.random.default_rng(4321)
    hi_scenes = [sample_scene(rng) for _ in range(args.n_upscale)]
    hires = np.stack([render(s, 128) for s in hi_scenes])
    low = np.stack([bicubic(h) for h in hires])
    x4_defaults = ctx.registry.get("shapes-x4")["defaults"]
    steps, level = x4_defaults["steps"], x4_defaults["noise_level"]
    hi_prompts = [s.prompt("color") for s in hi_scenes]
    up = upscale(x4, low, hi_prompts, steps=steps, noise_level=level)
    # Also a 20-step sample: sharper detail, but a sample, not the mean PSNR rewards.
    sampled = upscale(x4, low, hi_prompts, steps=20, noise_level=20)
    bic = np.stack([np.asarray(Image.fromarray(lo).resize((128, 128), Image.Resampling.BICUBIC))
                    for lo in low])

    def mean_psnr(images: np.ndarray) -> float:
        return float(np.mean([psnr(a, b) for a, b in zip(images, hires, strict=True)]))

    report["upscaler"] = {
        "n": len(hires), "steps": steps, "noise_level": level, "guidance_scale": 0.0,
        "psnr_model": mean_psnr(up), "psnr_bicubic": mean_psnr(bic),
        "psnr_sampled_20_steps_noise_20": mean_psnr(sampled),
    }

    # 4. The judge's verdict on shapes-sd images before and after upscaling.
    gen = samples[best][: args.n_upscale]
    gen_up = upscale(x4, gen, prompts[: len(gen)], seed=7, steps=steps, noise_level=level)
    before, after = clf.predict(gen), clf.predict(downsample(gen_up))
    report["cascade_verdict_kept"] = float(np.mean(
        [(a["shape"], a["color"]) == (b["shape"], b["color"])
         for a, b in zip(before, after, strict=True)]))
    report["seconds"] = round(time.monotonic() - t0)

    # Contact sheet: rows are the 24 prompts, columns seeds, at the chosen guidance.
    k = min(args.per_prompt, 8)
    grid = samples[best].reshape(len(PROMPTS), args.per_prompt, 32, 32, 3)[:, :k]
    sheet = grid.transpose(0, 2, 1, 3, 4).reshape(len(PROMPTS) * 32, k * 32, 3)
    Image.fromarray(sheet).resize((k * 64, len(PROMPTS) * 64), Image.Resampling.NEAREST).save(
        out / "contact_sheet.png")
    up_sheet = np.concatenate([np.concatenate(list(bic[:6]), 1),
                               np.concatenate(list(up[:6]), 1),
                               np.concatenate(list(hires[:6]), 1)], 0)
    Image.fromarray(up_sheet).save(out / "upscale_sheet.png")
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
