from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from worker.progress import JobCanceled
from worker.tiny import tiny_upscaler
from worker.upscale import UpscaleParams, plan, ramp, tile_starts, upscale


@pytest.mark.parametrize(("length", "tile", "overlap"), [(256, 128, 16), (100, 32, 8),
                                                         (33, 32, 8), (32, 32, 8)])
def test_tiles_cover_the_image_with_at_least_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, length) == length
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + tile - b >= overlap


def test_ramps_of_neighbours_sum_to_one_across_their_overlap():
    left_tile = ramp(40, 0, 12)
    right_tile = ramp(40, 12, 0)
    assert np.allclose(left_tile[-12:] + right_tile[:12], 1.0)
    assert (left_tile[:-12] == 1).all() and (right_tile[12:] == 1).all()


@pytest.fixture(scope="module")
def pipe():
    p = tiny_upscaler(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def test_small_image_is_one_call_and_four_times_larger(pipe):
    image = Image.new("RGB", (12, 8), (10, 200, 30))
    calls = []
    out = upscale(pipe, image, UpscaleParams(steps=2, tile=16),
                  on_step=lambda done, total: calls.append((done, total)))
    assert out.size == (48, 32)
    assert calls == [(1, 2), (2, 2)]


def test_large_image_goes_in_bounded_tiles_with_progress_over_all_of_them(pipe):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8))
    seen_sizes = []
    original = pipe.__class__.__call__

    class Spy(pipe.__class__):  # a subclass that records each tile's size, nothing else
        def __call__(self, *args, **kwargs):
            seen_sizes.append(kwargs["image"].size)
            return original(self, *args, **kwargs)

    spy = Spy(**pipe.components)
    spy.set_progress_bar_config(disable=True)
    steps = []
    out = upscale(spy, image, UpscaleParams(steps=2, tile=24, overlap=8),
                  on_step=lambda done, total: steps.append((done, total)))
    assert out.size == (224, 160)
    assert len(seen_sizes) == len(plan(56, 40, 24, 8)) == 6
    assert all(w <= 24 and h <= 24 for w, h in seen_sizes)
    assert steps[-1] == (12, 12) and [s for s, _ in steps] == list(range(1, 13))


def test_cancel_from_the_step_callback_stops_between_steps(pipe):
    image = Image.new("RGB", (8, 8))
    done = []

    def on_step(step, total):
        done.append(step)
        if step == 2:
            raise JobCanceled("x")

    with pytest.raises(JobCanceled):
        upscale(pipe, image, UpscaleParams(steps=10, tile=16), on_step)
    assert done == [1, 2]


@pytest.mark.parametrize("size", [(13, 9), (3, 3), (1, 1), (37, 21)])
def test_any_size_comes_out_exactly_four_times_larger(pipe, size):
    # The pipeline rounds its input down to a multiple of the VAE's factor (4 here): 13
    # pixels became 12 and the tile no longer fit its place; 3 became nothing.
    assert pipe.vae_scale_factor == 4
    image = Image.new("RGB", size, (10, 200, 30))
    out = upscale(pipe, image, UpscaleParams(steps=2, tile=16, overlap=4))
    assert out.size == (size[0] * 4, size[1] * 4)
