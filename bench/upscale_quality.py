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

import httpx
import numpy as np
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def wait(http: httpx.Client, job_id: str, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = http.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            assert job["status"] == "succeeded", job
            return job
        time.sleep(0.05)
    raise TimeoutError(job_id)


def image(http: httpx.Client, job: dict, index: int = 0) -> np.ndarray:
    r = http.get(job["result"]["images"][index]["url"])
    r.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


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
    http = httpx.Client(base_url=args.url, timeout=60)
    t0 = time.monotonic()

    # 1. generate -> upscale an earlier output; the judge before and after.
    originals, upscaled = [], []
    for i in range(args.n):
        color, shape = PROMPTS[i % len(PROMPTS)]
        gen = http.post("/generate", json={"prompt": f"a {color} {shape}", "model": "shapes-sd",
                                           "seed": 5000 + i})
        gen_job = wait(http, gen.json()["id"])
        up = http.post("/upscale", json={"source": {"job_id": gen_job["id"], "index": 0}})
        assert up.status_code == 202, up.text
        up_job = wait(http, up.json()["id"])
        originals.append(image(http, gen_job))
        upscaled.append(image(http, up_job))
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
        r = http.post("/upscale", files={"image": ("low.png", buf.getvalue(), "image/png")},
                      data={"prompt": scene.prompt("color"), "seed": "0"})
        assert r.status_code == 202, r.text
        out = image(http, wait(http, r.json()["id"]))
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
