"""Feature extractors and scorers for models of the generic domain, from local paths only.

A domain with a judge of its own measures with it (``worker.domains``). A Stable
Diffusion model needs the usual instruments, which the operator provides on disk (nothing
is downloaded): Inception-v3 pool features for FID and precision/recall, as a TorchScript
file; a CLIP model folder for CLIP score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.jobspecs import IMAGE_SUFFIXES
from worker.metrics import clip_score


class InceptionFeatures:
    """A TorchScript module that maps uint8 N×3×H×W images to N×D features.

    The module does its own resizing and normalisation, as NVIDIA's Inception export used by
    StyleGAN and clean-fid does, so Lethe feeds it the images as they are.
    """

    name = "inception"

    def __init__(self, path: Path, device: torch.device, batch: int = 32):
        self.model = torch.jit.load(str(path), map_location=device).eval()
        self.device, self.batch = device, batch

    @torch.inference_mode()
    def features(self, images: np.ndarray) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch):
            x = torch.from_numpy(images[i:i + self.batch]).permute(0, 3, 1, 2).to(self.device)
            out.append(self.model(x).float().flatten(1).cpu())
        return torch.cat(out)


class ClipScorer:
    """CLIP score (torchmetrics' definition) with a local transformers CLIP folder."""

    def __init__(self, path: Path, device: torch.device, batch: int = 32):
        from transformers import CLIPModel, CLIPProcessor

        model: Any = CLIPModel.from_pretrained(path, local_files_only=True)
        self.model = model.to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.device, self.batch = device, batch

    @torch.inference_mode()
    def image_embeddings(self, images: np.ndarray) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch):
            inputs = self.processor(images=[Image.fromarray(a) for a in images[i:i + self.batch]],
                                    return_tensors="pt")
            out.append(_embeds(self.model.get_image_features(
                pixel_values=inputs["pixel_values"].to(self.device))))
        return torch.cat(out)

    @torch.inference_mode()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch):
            inputs = self.processor(text=texts[i:i + self.batch], return_tensors="pt",
                                    padding=True, truncation=True)
            out.append(_embeds(self.model.get_text_features(
                input_ids=inputs["input_ids"].to(self.device),
                attention_mask=inputs["attention_mask"].to(self.device))))
        return torch.cat(out)

    def embeddings(self, images: np.ndarray, prompts: list[str]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_embeddings(images), self.text_embeddings(prompts)

    def score(self, images: np.ndarray, prompts: list[str]) -> float:
        return clip_score(*self.embeddings(images, prompts))


def _embeds(out: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooled projection is the embedding;
    # earlier versions return the tensor itself.
    t: Any = getattr(out, "pooler_output", out)
    return t.float().cpu()


def load_folder(folder: Path, size: tuple[int, int], limit: int) -> np.ndarray:
    """Up to ``limit`` images of a folder as uint8 N×H×W×3, resized to ``size`` (h, w)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    out = []
    for p in files:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB").resize((size[1], size[0]),
                                                           Image.Resampling.BICUBIC)))
    return np.stack(out)
