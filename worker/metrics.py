"""Image-set metrics on feature vectors: FID, improved precision/recall, CLIP score.

No model and no HTTP here: callers extract features (``worker.features``) and pass tensors.
Everything is computed in float64 on the CPU; the sets are a few thousand vectors at most.

* FID (Heusel et al. 2017): ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½, Gaussians fitted
  with the unbiased covariance, as torchmetrics does.
* Improved precision and recall (Kynkäänniemi et al. 2019): each reference vector's radius
  is the distance to its k-th nearest reference neighbour; precision is the share of
  generated vectors inside at least one reference ball, recall the share of reference
  vectors inside at least one generated ball (radii from the generated set).
* CLIP score as torchmetrics defines it: 100 · max(cos(image, text), 0), averaged.
"""

from __future__ import annotations

import torch

from app.errors import InvalidParams


def _as_matrix(x: torch.Tensor, name: str, min_rows: int = 2) -> torch.Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] < min_rows:
        raise InvalidParams(f"`{name}` must be a matrix of at least {min_rows} feature vectors, "
                            f"got shape {tuple(x.shape)}")
    return x


def gaussian(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of N×D features."""
    x = _as_matrix(features, "features")
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (round-off negatives → 0)."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                     sigma2: torch.Tensor) -> float:
    """Fréchet distance between two Gaussians.

    tr (Σ₁Σ₂)^½ is computed as tr (Σ₁^½ Σ₂ Σ₁^½)^½: the same eigenvalues, but the matrix is
    symmetric PSD, so ``eigh`` applies and no complex round-off appears (Σ₁Σ₂ itself is not
    symmetric and its general eigenvalues pick up imaginary parts near zero).
    """
    s1 = _sqrt_psd(sigma1)
    inner = s1 @ sigma2 @ s1
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    d = (mu1 - mu2).pow(2).sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return float(d.clamp(min=0))


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets (N×D and M×D)."""
    return frechet_distance(*gaussian(real), *gaussian(fake))


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    if x.shape[0] <= k:
        raise InvalidParams(f"precision/recall with k={k} needs more than {k} images per set, "
                            f"got {x.shape[0]}")
    out = []
    for part in x.split(chunk):
        d = torch.cdist(part, x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the row itself is at distance 0
    return torch.cat(out)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
              chunk: int) -> float:
    """Share of ``points`` inside at least one ball (centre, radius)."""
    inside = [(torch.cdist(part, centres) <= radii[None]).any(1) for part in points.split(chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3,
                     chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` against ``real`` (Kynkäänniemi et al.)."""
    real, fake = _as_matrix(real, "real"), _as_matrix(fake, "fake")
    precision = _coverage(fake, real, _knn_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _knn_radii(fake, k, chunk), chunk)
    return precision, recall


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """100 · max(cos(image, text), 0), averaged over matching rows."""
    img = _as_matrix(image_embeds, "image_embeds", 1)
    txt = _as_matrix(text_embeds, "text_embeds", 1)
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    return float((100 * cos.clamp(min=0)).mean())



def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 N×H×W×C image sets, pooled over all
    pixels (inf for identical sets)."""
    mse = ((a.double() - b.double()) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * torch.log10(255.0**2 / mse))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) of two uint8 N×H×W×C image sets:
    Gaussian windows, each channel on its own, borders left out (torchmetrics' default)."""
    x = a.double().permute(0, 3, 1, 2) / 255.0
    y = b.double().permute(0, 3, 1, 2) / 255.0
    channels = x.shape[1]
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum())[None, :] * (g / g.sum())[:, None]
    kernel = g.expand(channels, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, kernel, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    index = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(index.mean())
