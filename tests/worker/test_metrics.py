from __future__ import annotations

import pytest
import torch
from torch import nn

from app.errors import InvalidParams
from worker.metrics import clip_score, fid, precision_recall


class Features(nn.Module):
    """A fixed random projection of 3×8×8 images to 16 features (the custom extractor)."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, 16)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            self.proj.weight.copy_(torch.randn(16, 192, generator=g) / 8)
            self.proj.bias.copy_(torch.randn(16, generator=g))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images.float().flatten(1))


def images(n: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g) * scale + shift


def test_fid_equals_torchmetrics_with_the_same_feature_extractor():
    fid_metric = pytest.importorskip("torchmetrics.image.fid")
    extractor = Features()
    real, fake = images(400, 1), images(300, 2, shift=0.3, scale=1.2)
    metric = fid_metric.FrechetInceptionDistance(feature=extractor, normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    theirs = float(metric.compute())
    with torch.no_grad():
        ours = fid(extractor(real), extractor(fake))
    assert theirs > 1.0  # the sets differ, so the comparison is not of two zeros
    assert ours == pytest.approx(theirs, rel=1e-3)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_the_shift():
    x = torch.randn(500, 32, generator=torch.Generator().manual_seed(3))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-6)
    assert 0 < fid(x, x + 0.1) < fid(x, x + 0.5)
    # The mean term alone: a shift of 0.5 in 32 dimensions is 32 · 0.25 = 8.
    assert fid(x, x + 0.5) == pytest.approx(8.0, rel=1e-6)


def brute_force(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al.'s definition, written out with loops."""
    def radius(points: torch.Tensor, i: int) -> float:
        d = sorted(float((points[i] - points[j]).norm()) for j in range(len(points)) if j != i)
        return d[k - 1]

    def covered(x: torch.Tensor, centres: torch.Tensor) -> float:
        radii = [radius(centres, i) for i in range(len(centres))]
        hits = [any(float((p - c).norm()) <= r for c, r in zip(centres, radii, strict=True))
                for p in x]
        return sum(hits) / len(hits)

    return covered(fake, real), covered(real, fake)


def test_precision_recall_agree_with_a_brute_force_implementation():
    g = torch.Generator().manual_seed(4)
    real, fake = torch.randn(60, 5, generator=g), torch.randn(50, 5, generator=g) * 1.3 + 0.4
    ours = precision_recall(real.double(), fake.double(), k=3, chunk=7)
    assert ours == pytest.approx(brute_force(real.double(), fake.double(), 3), abs=1e-12)
    assert 0 < ours[0] < 1 and 0 < ours[1] < 1


def test_a_shifted_set_loses_precision_and_a_collapsed_one_loses_recall():
    g = torch.Generator().manual_seed(5)
    real = torch.randn(600, 8, generator=g)
    same = torch.randn(600, 8, generator=g)
    shifted = torch.randn(600, 8, generator=g) + 1.5
    collapsed = torch.randn(600, 8, generator=g) * 0.2  # one mode, little spread
    p_same, r_same = precision_recall(real, same)
    p_shift, _ = precision_recall(real, shifted)
    p_coll, r_coll = precision_recall(real, collapsed)
    # Measured: same 0.86 / 0.89, shifted precision 0.26, collapsed 1.0 / 0.0.
    assert p_same > 0.75 and r_same > 0.75
    assert p_shift < p_same - 0.4
    assert r_coll < r_same - 0.4
    assert p_coll > 0.95  # collapsed samples are still realistic: only recall falls


def test_clip_score_is_torchmetrics_definition():
    img = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    # cos = 1, 1/√2, −1 → 100, 70.71, 0 (negative clamps to zero).
    assert clip_score(img, txt) == pytest.approx((100 + 100 / 2 ** 0.5 + 0) / 3)


def test_too_few_images_is_a_clear_error():
    with pytest.raises(InvalidParams, match="k=3"):
        precision_recall(torch.randn(3, 4), torch.randn(10, 4))
    with pytest.raises(InvalidParams, match="at least 2"):
        fid(torch.randn(1, 4), torch.randn(10, 4))



def test_psnr_and_ssim_are_torchmetrics_definitions():
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    from worker.metrics import psnr, ssim

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (3, 32, 32, 3), generator=g, dtype=torch.uint8)
    b = (a.int() + torch.randint(-20, 21, a.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    as_float = [t.permute(0, 3, 1, 2).double() for t in (a, b)]
    expected = structural_similarity_index_measure(as_float[1], as_float[0], data_range=255.0)
    assert ssim(a, b) == pytest.approx(float(expected), abs=1e-4)  # its kernel rounds
    assert psnr(a, b) == pytest.approx(float(peak_signal_noise_ratio(
        as_float[1], as_float[0], data_range=255.0)), abs=1e-6)
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == float("inf")
