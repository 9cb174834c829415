"""Issue-level checks of upscaling through a running service's HTTP API.

    lethe serve &    # or any deployment; LETHE_HOME must hold shapes-clf for the judge
    python -m bench.upscale_quality --url http://127.0.0.1:8000 [--n 100]

1. ``--n`` ``shapes-sd`` images via ``POST /generate`` (32×32), each upscaled via
   ``POST /upscale`` with ``{"source": {"job_id", "index"}}``; ``shapes-clf`` judges the
   original and the upscaled image box-downsampled to 32×32: the share whose (shape,
   colour) verdict is unchanged.
2. ``--n`` held-out 128×128 renders, downsampled ×4 (bicubic), uploaded (multipart) to
   ``POST /upscale``: mean PSNR against the render, and bicubic upsampling's.
Prints JSON. Upscale parameters are the model's defaults unless given.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
from PIL import Image

from app.client import JobRef, LetheClient

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def image(lethe: LetheClient, job_id: JobRef) -> np.ndarray:
    """Image 0 of a job that must succeed."""
    job = lethe.wait(job_id, timeout_s=600)
    assert job.status == "succeeded", job
    return np.asarray(Image.open(io.BytesIO(lethe.image(job_id, 0))).convert("RGB"))


def main() -> None:
    from worker.domains.shapes.classifier import ShapesClassifier
    from worker.domains.shapes.degrade import bicubic
    from worker.domains.shapes.quality import PROMPTS, downsample, psnr
    from worker.domains.shapes.render import render, sample_scene

    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--classifier", default="worker/domains/shapes/models/shapes-clf")
    args = parser.parse_args()
    clf = ShapesClassifier.from_pretrained(args.classifier).float().eval()
    lethe = LetheClient(args.url, timeout_s=60)
    t0 = time.monotonic()

    # 1. generate -> upscale an earlier output; the judge before and after.
    originals, upscaled = [], []
    for i in range(args.n):
        color, shape = PROMPTS[i % len(PROMPTS)]
        gen = lethe.generate(prompt=f"a {color} {shape}", model="shapes-sd", seed=5000 + i)
        originals.append(image(lethe, gen))
        upscaled.append(image(lethe, lethe.upscale(source={"job_id": gen.id, "index": 0})))
    big = np.stack(upscaled)
    before, after = clf.predict(np.stack(originals)), clf.predict(downsample(big))
    kept = float(np.mean([(a["shape"], a["color"]) == (b["shape"], b["color"])
                          for a, b in zip(before, after, strict=True)]))

    # 2. held-out renders, uploaded.
    rng = np.random.default_rng(2468)
    scenes = [sample_scene(rng) for _ in range(args.n)]
    hires = np.stack([render(s, 128) for s in scenes])
    model_psnr, bic_psnr = [], []
    for scene, hi in zip(scenes, hires, strict=True):
        low = bicubic(hi)
        buf = io.BytesIO()
        Image.fromarray(low).save(buf, format="PNG")
        out = image(lethe, lethe.upscale(buf.getvalue(), prompt=scene.prompt("color"), seed=0))
        model_psnr.append(psnr(out, hi))
        bic = np.asarray(Image.fromarray(low).resize((128, 128), Image.BICUBIC))
        bic_psnr.append(psnr(bic, hi))
    print(json.dumps({
        "n": args.n, "upscaled_size": list(big.shape[1:3]),
        "cascade_verdict_kept": kept,
        "psnr_model": float(np.mean(model_psnr)), "psnr_bicubic": float(np.mean(bic_psnr)),
        "psnr_gain_db": float(np.mean(model_psnr) - np.mean(bic_psnr)),
        "seconds": round(time.monotonic() - t0, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
