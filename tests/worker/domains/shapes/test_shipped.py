"""The shipped "shapes" models, loaded offline through the registry as the service does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from app.registry import Registry
from tests.support import own_storage
from worker.context import WorkerContext
from worker.defaults import ensure_default_models
from worker.domains.shapes.degrade import bicubic
from worker.domains.shapes.domain import DEMO_DIR
from worker.domains.shapes.quality import psnr
from worker.domains.shapes.render import render, sample_scene
from worker.pipelines import with_scheduler

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "shapes-sd").is_dir(),
                                reason="the demo models are not shipped in this checkout")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from app.config import Settings

    settings = Settings(home=tmp_path_factory.mktemp("home"), device="cpu", dtype="float32",
                        **own_storage())
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


def test_a_registry_from_an_earlier_version_takes_the_packages_erase_defaults(ctx):
    from worker.domains.shapes.domain import DEMO_MANIFESTS

    registry: Registry = ctx.registry
    registry.update_manifest("shapes-sd", erase_defaults={"iterations": 1000})
    assert ensure_default_models(registry) == []  # nothing added: the models are there
    assert registry.get("shapes-sd")["erase_defaults"] == \
        DEMO_MANIFESTS["shapes-sd"]["erase_defaults"]


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


def seam_score(image: np.ndarray, starts: list[int], tile: int) -> float:
    """How much more the image jumps across a tile edge than across the columns (rows) just
    beside it, worst edge: about 1 where a tile edge is as smooth as its surroundings."""
    x = image.astype(np.float64)
    jumps = {"cols": np.abs(np.diff(x, axis=1)).mean(axis=(0, 2)),  # column j to j + 1
             "rows": np.abs(np.diff(x, axis=0)).mean(axis=(1, 2))}
    edges = sorted({e for s in starts for e in (s, s + tile)} - {0, x.shape[0] // 4})
    worst = 0.0
    for d in jumps.values():
        for e in edges:
            j = 4 * e - 1  # output columns 4e-1 | 4e: the tile edge
            near = np.r_[d[j - 8:j - 1], d[j + 2:j + 9]]
            worst = max(worst, d[j] / (near.mean() + 1e-6))
    return float(worst)


def test_large_upload_upscales_in_tiles_without_seams(ctx):
    from worker.upscale import UpscaleParams, tile_starts, upscale

    pipe, _ = ctx.cache.get("shapes-x4")
    # A 256×256 input: four shapes over a smooth gradient, so seams have nowhere to hide.
    yy, xx = np.mgrid[0:256, 0:256]
    image = np.stack([80 + xx * 0.5, 120 + yy * 0.3, 200 - (xx + yy) * 0.2], -1)
    rng = np.random.default_rng(3)
    for cy in (64, 192):
        for cx in (64, 192):
            tile = render(sample_scene(rng), 64)
            image[cy - 24:cy + 24, cx - 24:cx + 24] = tile[8:56, 8:56]
    image = image.clip(0, 255).astype(np.uint8)

    def run(tile: int, overlap: int) -> np.ndarray:
        p = UpscaleParams(prompt="", steps=6, noise_level=20, seed=0, tile=tile,
                          overlap=overlap)
        return np.asarray(upscale(pipe, Image.fromarray(image), p))

    blended = run(96, 24)
    assert blended.shape == (1024, 1024, 3)
    score = seam_score(blended, tile_starts(256, 96, 24), 96)
    # The same tiles cut edge to edge, without blending: the seams the blend removes.
    hard = seam_score(run(128, 0), tile_starts(256, 128, 0), 128)
    print(f"seam score blended {score:.2f}, hard-cut {hard:.2f}")
    assert score < 2.0 and hard > 3 * score
