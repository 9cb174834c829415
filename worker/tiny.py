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
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from worker.tokenizer import write_clip_tokenizer

TINY_WORDS = "a an the red orange yellow green blue purple circle square triangle cross on".split()


def sd_scheduler() -> DDIMScheduler:
    """Stable Diffusion's own noise schedule, so step counts behave as they do there."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1)


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
    scheduler = sd_scheduler()
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


def _text_encoder(tokenizer, seed: int, cls=CLIPTextModel, **config) -> CLIPTextModel:
    torch.manual_seed(seed)
    return cls(CLIPTextConfig(
        vocab_size=len(tokenizer), intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=32, **{"hidden_size": 32, **config}))


def tiny_sd2_pipeline(seed: int = 0, prediction_type: str = "v_prediction"
                      ) -> StableDiffusionPipeline:
    """Stable Diffusion 2.x in miniature: an OpenCLIP-style text encoder (GELU), linear
    projections in the UNet's transformers, and v-prediction by default as the 768 model."""
    parts = tiny_components(seed)
    torch.manual_seed(seed)
    parts["unet"] = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)
    parts["text_encoder"] = _text_encoder(parts["tokenizer"], seed, hidden_act="gelu")
    parts["scheduler"] = DDIMScheduler.from_config(parts["scheduler"].config,
                                                   prediction_type=prediction_type)
    return StableDiffusionPipeline(**parts, requires_safety_checker=False)


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL in miniature: two text encoders (the second with a projection, whose pooled
    output and the size/crop time ids condition the UNet through ``add_embedding``)."""
    parts = tiny_components(seed)
    tokenizer = parts["tokenizer"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        # six time ids of 8 each and the second encoder's pooled 32; the two encoders'
        # states side by side, 32 + 48 (unequal widths: single-file readers tell the two
        # encoders apart by them, as SDXL's 768 and 1280)
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=32 + 48,
        norm_num_groups=8)
    return StableDiffusionXLPipeline(
        vae=parts["vae"], unet=unet, scheduler=parts["scheduler"], tokenizer=tokenizer,
        tokenizer_2=tokenizer, text_encoder=_text_encoder(tokenizer, seed),
        text_encoder_2=_text_encoder(tokenizer, seed + 1, CLIPTextModelWithProjection,
                                     hidden_act="gelu", hidden_size=48),
        add_watermarker=False)


def save_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny pipeline as an ordinary diffusers folder."""
    folder = Path(folder)
    tiny_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_upscaler(seed: int = 0) -> StableDiffusionUpscalePipeline:
    """A tiny random ×4 upscaler in Stability's x4 layout: the low-resolution image is
    concatenated to the latents (4 + 3 channels) and its noise level is a class label."""
    base = tiny_components(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32), down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, cross_attention_dim=32, norm_num_groups=8,
        num_class_embeds=351,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(  # three blocks: a ×4 decoder, as the x4 upscaler's
        block_out_channels=(16, 16, 16), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4, norm_num_groups=8, scaling_factor=0.08333,
    )
    return StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=base["text_encoder"], tokenizer=base["tokenizer"], unet=unet,
        low_res_scheduler=DDPMScheduler(beta_start=0.0001, beta_end=0.02,
                                        beta_schedule="linear", num_train_timesteps=1000),
        scheduler=base["scheduler"], max_noise_level=350,
    )


def save_tiny_upscaler(folder: str | Path, seed: int = 0) -> Path:
    folder = Path(folder)
    tiny_upscaler(seed).save_pretrained(folder, safe_serialization=True)
    return folder
