"""`lethe train shapes` end to end at a tiny scale: every model it writes loads and runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionUpscalePipeline
from PIL import Image

from app.cli import main
from worker.domains.shapes.classifier import ShapesClassifier, to_tensor
from worker.domains.shapes.render import Scene, render

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    main(["train", "shapes", "--out", str(out), "--scale", "0.003"])
    return out


def test_text_to_image_folder_loads_unmodified_and_generates(trained):
    pipe = StableDiffusionPipeline.from_pretrained(trained / "shapes-sd", local_files_only=True,
                                                   torch_dtype=torch.float32)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 4  # 32×32 images, 8×8×4 latents
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.unet.dtype == torch.float32  # shipped as fp16, upcast on load
    image = pipe("a red circle", num_inference_steps=2, width=32, height=32,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    assert all(f.stat().st_size < 20 * 1024**2 for f in trained.rglob("*.safetensors"))


def test_upscaler_folder_has_the_x4_layout(trained):
    pipe = StableDiffusionUpscalePipeline.from_pretrained(trained / "shapes-x4",
                                                          local_files_only=True,
                                                          torch_dtype=torch.float32)
    assert pipe.unet.config.in_channels == 4 + 3  # latents + low-resolution image
    low = Image.fromarray(render(Scene("square", "red", "white", 0.5, 0.5, 0.3), 32))
    out = pipe(prompt="a red square", image=low, num_inference_steps=2, noise_level=20,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 128, 128, 3)


def test_classifier_folder_loads_and_predicts(trained):
    clf = ShapesClassifier.from_pretrained(trained / "shapes-clf", torch_dtype=torch.float32)
    img = render(Scene("cross", "blue", "gray", 0.5, 0.5, 0.3), 32)[None]
    verdict = clf.predict(img)[0]
    assert set(verdict) == {"shape", "color", "background"}
    assert clf(to_tensor(img))["features"].shape == (1, clf.config.features)


def test_rescaled_vae_keeps_images_and_scaled_latents():
    from worker.domains.shapes.train import UPSCALER_SCALING_FACTOR, make_vae, rescale_latents

    torch.manual_seed(0)
    vae = make_vae().eval()
    vae.register_to_config(scaling_factor=1.1)
    copy = rescale_latents(vae, UPSCALER_SCALING_FACTOR)
    assert copy.config.scaling_factor == UPSCALER_SCALING_FACTOR  # what the pipeline demands
    assert vae.config.scaling_factor == 1.1  # the original is untouched
    x = to_tensor(render(Scene("circle", "red", "gray", 0.5, 0.5, 0.3), 32)[None])
    with torch.no_grad():
        z, z2 = vae.encode(x).latent_dist.mode(), copy.encode(x).latent_dist.mode()
        torch.testing.assert_close(z2 * UPSCALER_SCALING_FACTOR, z * 1.1, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(copy.decode(z2).sample, vae.decode(z).sample,
                                   rtol=1e-4, atol=1e-4)
