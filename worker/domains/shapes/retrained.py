"""The reference an erasure is measured against: ``shapes-sd`` retrained without a concept.

Unlearning's gold standard is the model that never saw the data: here, ``shapes-sd``'s own
recipe (``worker.domains.shapes.train``: the same scenes from the same seed, the same
steps) with every scene of the concept dropped, on the shipped VAE and tokenizer.
``lethe train shapes --without CONCEPT`` makes it and adds it to the registry
(``worker.reference``), where every erasure and attack report on ``shapes-sd``'s edits
measures the gap to it, and ``python -m bench.attacks`` puts it beside every method.
"""

from __future__ import annotations

import copy
from typing import Any

from worker.domains.shapes import train
from worker.domains.shapes.render import COLORS, SHAPES

MODEL = "shapes-sd"


def without(data: train.Data, concept: str) -> train.Data:
    """``data`` less every 32×32 scene showing ``concept`` (a shape, or a shape's colour);
    the 128×128 scenes, which the text-to-image model does not see, are kept."""
    if concept in SHAPES:
        keep = data.labels[:, 0] != SHAPES.index(concept)
    elif concept in COLORS:
        keep = data.labels[:, 1] != list(COLORS).index(concept)
    else:
        raise ValueError(f"`concept` must be a shape {SHAPES} or a colour {tuple(COLORS)}, "
                         f"got {concept!r}")
    return train.Data(data.images[keep], data.labels[keep], data.prompt_ids[keep],
                      data.hires, data.hires_prompt_ids)


def retrain(shipped: Any, concept: str, cfg: train.DemoConfig, log: Any = print) -> Any:
    """``shapes-sd``'s text encoder and UNet trained from scratch without ``concept``, as a
    pipeline on ``shipped``'s VAE and tokenizer."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    data = without(train.make_data(cfg, shipped.tokenizer, log), concept)
    log(f"[data] {len(data.images)} scenes without {concept!r}")
    vae = copy.deepcopy(shipped.vae).float()  # the shipped pipeline stays as it is
    text_encoder, unet = train.train_sd(cfg, data, vae, shipped.tokenizer, log)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=shipped.tokenizer, unet=unet,
        scheduler=DDIMScheduler(**train.SD_SCHEDULE), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
