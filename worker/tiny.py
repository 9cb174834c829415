"""A tiny, randomly initialised Stable Diffusion pipeline built from configs.

It has the exact component classes of Stable Diffusion at a few hundred kilobytes, so tests
and a fresh install can run the whole path (registry -> cache -> denoising -> PNG) on a CPU
in milliseconds a step. Its pictures are noise-like: it proves plumbing, not quality.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from worker.tokenizer import write_clip_tokenizer

TINY_WORDS = "a an the red orange yellow green blue purple circle square triangle cross on".split()


def tiny_components(seed: int = 0) -> dict:
    """Return the components of a tiny SD pipeline; same seed, same weights."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=32,
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
    )
    # Stable Diffusion's own noise schedule, so step counts behave as they do there.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_clip_tokenizer(tmp, TINY_WORDS, model_max_length=16)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=32,
        )
    )
    return {
        "unet": unet,
        "vae": vae,
        "scheduler": scheduler,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(**tiny_components(seed), requires_safety_checker=False)


def save_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny pipeline as an ordinary diffusers folder."""
    folder = Path(folder)
    tiny_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder
