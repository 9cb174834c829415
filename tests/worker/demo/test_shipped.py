"""The shipped "shapes" models, loaded offline through the registry as the service does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from app.registry import Registry
from worker.context import WorkerContext
from worker.defaults import DEMO_DIR, ensure_default_models
from worker.demo.degrade import bicubic
from worker.demo.quality import psnr
from worker.demo.render import render, sample_scene
from worker.pipelines import with_scheduler

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "shapes-sd").is_dir(),
                                reason="the demo models are not shipped in this checkout")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from app.config import Settings

    settings = Settings(home=tmp_path_factory.mktemp("home"), device="cpu", dtype="float32")
    context = WorkerContext.from_settings(settings)
    added = ensure_default_models(context.registry)
    assert {"shapes-sd", "shapes-x4", "shapes-clf"} <= set(added)
    return context


def test_registered_with_manifest_and_metrics(ctx):
    registry: Registry = ctx.registry
    sd = registry.get("shapes-sd")
    assert sd["kind"] == "text-to-image" and sd["defaults"]["width"] == 32
    assert registry.get("shapes-x4")["kind"] == "upscaler"
    assert registry.get("shapes-clf")["kind"] == "classifier"
    assert sd["metrics"]["generation"]["n"] >= 200


def test_classifier_is_right_on_fresh_renders(ctx):
    clf, _ = ctx.cache.get("shapes-clf")
    rng = np.random.default_rng(99)
    scenes = [sample_scene(rng) for _ in range(300)]
    verdicts = clf.predict(np.stack([render(s, 32) for s in scenes]))
    for key in ("shape", "color"):
        pairs = zip(verdicts, scenes, strict=True)
        accuracy = np.mean([v[key] == getattr(s, key) for v, s in pairs])
        assert accuracy >= 0.98, (key, accuracy)


@pytest.mark.parametrize(("color", "shape", "seed"), [
    ("red", "circle", 1), ("blue", "square", 2), ("green", "triangle", 3),
    ("purple", "cross", 4), ("yellow", "triangle", 5), ("orange", "square", 6),
])
def test_generated_image_shows_the_prompted_shape_and_colour(ctx, color, shape, seed):
    pipe, _ = ctx.cache.get("shapes-sd")
    clf, _ = ctx.cache.get("shapes-clf")
    guidance = ctx.registry.get("shapes-sd")["defaults"]["guidance_scale"]
    with torch.inference_mode():
        image = with_scheduler(pipe, "ddim")(
            f"a {color} {shape}", num_inference_steps=30, guidance_scale=guidance,
            width=32, height=32, output_type="np",
            generator=torch.Generator().manual_seed(seed)).images
    verdict = clf.predict((image * 255).round().astype(np.uint8))[0]
    assert (verdict["shape"], verdict["color"]) == (shape, color)


def test_upscaler_beats_bicubic(ctx):
    pipe, _ = ctx.cache.get("shapes-x4")
    rng = np.random.default_rng(7)
    scenes = [sample_scene(rng) for _ in range(4)]
    hires = np.stack([render(s, 128) for s in scenes])
    low = np.stack([bicubic(h) for h in hires])
    with torch.inference_mode():
        up = pipe(prompt=[s.prompt("color") for s in scenes],
                  image=[Image.fromarray(lo) for lo in low],
                  num_inference_steps=20, guidance_scale=0.0, noise_level=20, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    up = (up * 255).round().astype(np.uint8)
    bic = np.stack([np.asarray(Image.fromarray(lo).resize((128, 128), Image.BICUBIC))
                    for lo in low])
    assert up.shape == (4, 128, 128, 3)
    assert np.mean([psnr(a, b) for a, b in zip(up, hires, strict=True)]) > np.mean(
        [psnr(a, b) for a, b in zip(bic, hires, strict=True)])
