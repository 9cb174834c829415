"""Live previews: the scheduler's x̂₀ kept per step, decoded every k steps, changing
nothing in the image itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.pipelines import rebuild, with_scheduler
from worker.previews import Previewer, fit_preview_map, previewing
from worker.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


def draw(pipe, scheduler: str, every: int = 0, preview_map=None, size: int = 32):
    sent: list[tuple[int, int, str]] = []
    p = with_scheduler(pipe, scheduler)
    callback = lambda _p, _s, _t, kw: kw  # noqa: E731
    if every:
        p = rebuild(p, scheduler=previewing(p.scheduler))
        previewer = Previewer(p, every, 20, lambda *a: sent.append(a), preview_map)
        callback = previewer.wrap(callback)
    out = p("a red circle", num_inference_steps=20, height=size, width=size, output_type="np",
            generator=torch.Generator().manual_seed(1), callback_on_step_end=callback)
    return out.images[0], sent, p.scheduler


@pytest.mark.parametrize(("scheduler", "estimates"), [("ddim", True), ("euler", True),
                                                      ("dpmpp_2m", False)])
def test_previews_every_k_steps_change_nothing_in_the_image(pipe, scheduler, estimates):
    plain, _, _ = draw(pipe, scheduler)
    watched, sent, used = draw(pipe, scheduler, every=5)
    assert [s for s, _, _ in sent] == [5, 10, 15]  # step 20 is the image itself
    assert all(url.startswith("data:image/png;base64,") for _, _, url in sent)
    assert np.array_equal(plain, watched)
    # x̂₀ where the scheduler estimates it; the current latent where it does not.
    assert (used.pred_original is not None) == estimates


def test_large_images_preview_through_a_fitted_linear_map(pipe):
    weights = fit_preview_map(pipe.vae)
    assert np.array(weights).shape == (pipe.vae.config.latent_channels + 1, 3)
    previewer = Previewer(pipe, 5, 20, lambda *a: None, weights)
    latents = torch.randn(1, 4, 96, 96)  # a 192 px image: past the VAE's share
    rgb = previewer.decode(latents)
    assert rgb.shape == (1, 96, 96, 3) and rgb.dtype == np.uint8  # at the latent's size
    assert previewer.decode(torch.randn(1, 4, 8, 8)).shape == (1, 16, 16, 3)  # small: VAE
