"""``shapes-clf``: a small CNN that says which shape, colour and background an image shows.

It is the domain's judge, as the ESD paper judged object erasure with a ResNet-50, and its
penultimate features stand in for Inception features in FID and precision/recall. It uses
diffusers' ``ModelMixin``/``ConfigMixin`` so it saves and loads like every other component.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from worker.domains.shapes.render import BACKGROUNDS, COLORS, SHAPES


class ShapesClassifier(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, width: int = 32, features: int = 128, image_size: int = 32,
                 shapes: tuple = SHAPES, colors: tuple = tuple(COLORS),
                 backgrounds: tuple = tuple(BACKGROUNDS)):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(3, width), block(width, 2 * width),
                                  block(2 * width, 4 * width))
        side = image_size // 8
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * side * side, features),
                                  nn.ReLU())
        self.shape_head = nn.Linear(features, len(shapes))
        self.color_head = nn.Linear(features, len(colors))
        self.background_head = nn.Linear(features, len(backgrounds))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [-1, 1], N×3×H×W (resized to image_size)."""
        side = self.config.image_size
        if images.shape[-1] != side:
            images = nn.functional.interpolate(images, size=(side, side), mode="area")
        return self.neck(self.body(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {"shape": self.shape_head(f), "color": self.color_head(f),
                "background": self.background_head(f), "features": f}

    @torch.inference_mode()
    def predict(self, images: np.ndarray | torch.Tensor) -> list[dict[str, str]]:
        """Labels for uint8 images (N×H×W×3) or tensors in [-1, 1]."""
        x = to_tensor(images) if isinstance(images, np.ndarray) else images
        out = self.eval()(x.to(self.device, self.dtype))
        names = {"shape": self.config.shapes, "color": self.config.colors,
                 "background": self.config.backgrounds}
        idx = {k: out[k].argmax(-1).tolist() for k in names}
        return [{k: names[k][idx[k][i]] for k in names} for i in range(len(x))]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 -> float N×3×H×W in [-1, 1], the range diffusers pipelines use."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
