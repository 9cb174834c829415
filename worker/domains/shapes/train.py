"""``lethe train shapes``: train the "shapes" family from scratch, seeded, on a CPU.

Four recipes, each a loop with a progress line:

1. ``shapes-clf``  a classifier of shape, colour and background (the domain's judge);
2. the VAE       an ``AutoencoderKL`` 32×32×3 → 8×8×4, shared by both pipelines;
3. ``shapes-sd``   a ``CLIPTextModel`` and ``UNet2DConditionModel`` trained jointly on
                   ε-prediction, with empty prompts 10% of the time for classifier-free
                   guidance;
4. ``shapes-x4``   an upscaler UNet in ``StableDiffusionUpscalePipeline`` layout: latents of
                   the 128×128 image, concatenated with the noised 32×32 input, conditioned
                   on the noise level.

Each lands as an ordinary diffusers folder (fp16 safetensors) in ``out/<model-id>``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from worker.domains.shapes.classifier import ShapesClassifier, to_tensor
from worker.domains.shapes.degrade import degrade
from worker.domains.shapes.render import (
    BACKGROUNDS,
    COLORS,
    PROMPT_FORMS,
    PROMPT_WEIGHTS,
    SHAPES,
    WORDS,
    render,
    sample_scene,
)
from worker.pipelines import save_pipeline
from worker.tokenizer import write_clip_tokenizer

Log = Callable[[str], None]

# Stable Diffusion's noise schedule (scaled-linear betas 0.00085..0.012, 1000 steps).
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                   steps_offset=1, prediction_type="epsilon")
# The upscaler predicts v, as Stability's x4 upscaler does: with ε-prediction its image
# estimate at high noise is ε's small error divided by a tiny √ᾱ, and the sampler starts from
# a wrong picture that the low-resolution input cannot pull back (measured: 11.9 dB PSNR
# against 29.4 for bicubic).
# Its sampler starts at t = 999 ("trailing" spacing): in one step it then returns its
# estimate of the posterior mean, the image that maximises PSNR (measured: 31.6 dB, against
# 29.7 dB for a 20-step sample and 29.3 dB for bicubic).
X4_SCHEDULE = {**SD_SCHEDULE, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
# The x4 upscaler's schedule for noising its low-resolution input (as Stability's).
LOW_RES_SCHEDULE = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        num_train_timesteps=1000)
MAX_NOISE_LEVEL = 350
MAX_TOKENS = 16


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    n_images: int = 24000  # 32×32 scenes for the classifier, VAE and text-to-image model
    n_hires: int = 2400  # 128×128 scenes for the VAE's crops and the upscaler
    # Step counts sized for 2 CPU cores in well under an hour (measured on one: about
    # 0.06, 0.11, 0.25 and 0.11 s a step for the four recipes). The VAE's 4000 steps buy
    # the upscaler its ceiling: its 128×128 round trip went from 31.8 dB at 1600 steps to
    # 34.1 dB, above the 31.3 dB that "bicubic + 2 dB" asks for.
    clf_steps: int = 500
    clf_batch: int = 64
    vae_steps: int = 4000
    vae_batch: int = 32
    sd_steps: int = 3000
    sd_batch: int = 64
    x4_steps: int = 5000
    x4_batch: int = 16
    x4_crop: int = 16  # latent crop side while training the upscaler (64×64 pixels)
    lr: float = 1e-3
    threads: int = 0  # torch threads; 0 leaves torch's default

    def scaled(self, factor: float) -> DemoConfig:
        """The same recipe with every step count and data size multiplied (smoke runs)."""
        def s(v: int, least: int = 2) -> int:
            return max(least, int(v * factor))

        return replace(self, n_images=s(self.n_images, 64), n_hires=s(self.n_hires, 16),
                       clf_steps=s(self.clf_steps), vae_steps=s(self.vae_steps),
                       sd_steps=s(self.sd_steps), x4_steps=s(self.x4_steps))


class Progress:
    """One line per report: stage, step/total, recent loss, elapsed and remaining time."""

    def __init__(self, stage: str, total: int, log: Log, every_s: float = 15.0):
        self.stage, self.total, self.log, self.every_s = stage, total, log, every_s
        self.t0 = self.last = time.monotonic()
        self.losses: list[float] = []

    def step(self, i: int, loss: float) -> None:
        self.losses.append(loss)
        now = time.monotonic()
        if now - self.last >= self.every_s or i + 1 == self.total:
            self.last = now
            done = i + 1
            eta = (now - self.t0) / done * (self.total - done)
            recent = float(np.mean(self.losses[-50:]))
            self.log(f"[{self.stage}] {done}/{self.total} loss {recent:.4f} "
                     f"elapsed {now - self.t0:.0f}s eta {eta:.0f}s")

    @property
    def final_loss(self) -> float:
        return float(np.mean(self.losses[-50:])) if self.losses else float("nan")


def cosine_lr(opt: torch.optim.Optimizer, total: int, warmup: int = 100):
    def f(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


# ---------------------------------------------------------------- data


@dataclass
class Data:
    images: np.ndarray  # N×32×32×3 uint8
    labels: np.ndarray  # N×3 (shape, colour, background indexes)
    prompt_ids: np.ndarray  # N×4×MAX_TOKENS token ids, one row per prompt form
    hires: np.ndarray  # M×128×128×3 uint8
    hires_prompt_ids: np.ndarray  # M×MAX_TOKENS


def make_data(cfg: DemoConfig, tokenizer, log: Log) -> Data:
    rng = np.random.default_rng(cfg.seed)
    t0 = time.monotonic()
    scenes = [sample_scene(rng) for _ in range(cfg.n_images)]
    images = np.stack([render(s, 32) for s in scenes])
    labels = np.array([(SHAPES.index(s.shape), list(COLORS).index(s.color),
                        list(BACKGROUNDS).index(s.background)) for s in scenes])

    def tok(texts: list[str]) -> np.ndarray:
        return np.asarray(tokenizer(texts, padding="max_length", max_length=MAX_TOKENS,
                                    truncation=True).input_ids)

    prompt_ids = np.stack([tok([s.prompt(f) for s in scenes]) for f in PROMPT_FORMS], axis=1)
    hi_scenes = [sample_scene(rng) for _ in range(cfg.n_hires)]
    hires = np.stack([render(s, 128) for s in hi_scenes])
    hires_ids = tok([s.prompt("color") for s in hi_scenes])
    log(f"[data] {len(images)} scenes at 32x32 and {len(hires)} at 128x128 "
        f"in {time.monotonic() - t0:.0f}s")
    return Data(images, labels, prompt_ids, hires, hires_ids)


# ---------------------------------------------------------------- classifier


def train_classifier(cfg: DemoConfig, data: Data, log: Log) -> ShapesClassifier:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    model = ShapesClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr * 2, weight_decay=1e-4)
    sched = cosine_lr(opt, cfg.clf_steps, warmup=50)
    progress = Progress("shapes-clf", cfg.clf_steps, log)
    ce = nn.CrossEntropyLoss()
    model.train()
    for i in range(cfg.clf_steps):
        idx = rng.integers(len(data.images), size=cfg.clf_batch)
        x = to_tensor(data.images[idx])
        # Judge generated images too: a little noise and blur, as a sampler leaves.
        x = x + torch.randn_like(x) * float(rng.uniform(0, 0.08))
        if rng.random() < 0.3:
            x = nn.functional.avg_pool2d(x, 3, 1, 1)
        y = torch.from_numpy(data.labels[idx])
        out = model(x)
        loss = (ce(out["shape"], y[:, 0]) + ce(out["color"], y[:, 1])
                + ce(out["background"], y[:, 2]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        progress.step(i, loss.item())
    return model.eval()


# ---------------------------------------------------------------- VAE


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=16,
        # Fully convolutional: the same weights decode 8×8 latents and 32×32 ones (the
        # upscaler's), where a mid-block attention trained on 64 tokens would not carry over.
        mid_block_add_attention=False,
    )


def vae_batch(data: Data, rng: np.random.Generator, n: int) -> torch.Tensor:
    """Half whole 32×32 scenes, half 32×32 crops of 128×128 ones: the upscaler's scale too."""
    half = n // 2
    small = data.images[rng.integers(len(data.images), size=half)]
    big = data.hires[rng.integers(len(data.hires), size=n - half)]
    ys, xs = rng.integers(0, 97, size=(2, n - half))
    crops = np.stack([b[y:y + 32, x:x + 32] for b, y, x in zip(big, ys, xs, strict=True)])
    return to_tensor(np.concatenate([small, crops]))


def train_vae(cfg: DemoConfig, data: Data, log: Log) -> AutoencoderKL:
    torch.manual_seed(cfg.seed + 2)
    rng = np.random.default_rng(cfg.seed + 2)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0)
    sched = cosine_lr(opt, cfg.vae_steps)
    progress = Progress("vae", cfg.vae_steps, log)
    vae.train()
    for i in range(cfg.vae_steps):
        x = vae_batch(data, rng, cfg.vae_batch)
        posterior = vae.encode(x).latent_dist
        # Decode the posterior's mean: the diffusion models train on (and sample) means, so
        # the decoder must be exact on them. The small KL term keeps them near a unit
        # Gaussian's scale, as Stable Diffusion's VAE does.
        recon = vae.decode(posterior.mode()).sample
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        progress.step(i, loss.item())
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(vae_batch(data, rng, 256)).latent_dist.mode()
                       for _ in range(4)])
    # The latents' scale, measured: diffusion expects unit variance.
    vae.register_to_config(scaling_factor=float(1 / z.std()))
    log(f"[vae] scaling_factor {vae.config.scaling_factor:.4f}")
    return vae


@torch.no_grad()
def encode(vae: AutoencoderKL, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Scaled posterior means of every image: the latents both diffusion models learn."""
    means = [vae.encode(to_tensor(images[i:i + batch])).latent_dist.mode()
             for i in range(0, len(images), batch)]
    return torch.cat(means) * vae.config.scaling_factor


UPSCALER_SCALING_FACTOR = 0.08333


def rescale_latents(vae: AutoencoderKL, scaling_factor: float) -> AutoencoderKL:
    """A copy of ``vae`` with the given ``scaling_factor`` and latents scaled to match.

    The copy's latents are k = old / new ``scaling_factor`` times the original's, so
    latents × scaling_factor, what a diffusion model sees, are unchanged, and so are images.

    ``StableDiffusionUpscalePipeline`` sets its VAE's ``scaling_factor`` to 0.08333 (that of
    Stability's x4 upscaler) whatever the folder says. Scaling the encoder's mean (and the
    log-variance by 2·ln k) up by k and the decoder's first 1×1 convolution down by k is an
    exact reparametrisation, so with k = scaling_factor / 0.08333 the upscaler sees exactly
    the latents its UNet trained on.
    """
    k = vae.config.scaling_factor / scaling_factor
    vae = copy.deepcopy(vae)
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[:c] *= k
        vae.quant_conv.bias[:c] *= k
        vae.quant_conv.bias[c:] += 2 * math.log(k)
        vae.post_quant_conv.weight /= k
    vae.register_to_config(scaling_factor=scaling_factor)
    return vae


# ---------------------------------------------------------------- text-to-image


def make_text_encoder(tokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=128,
    ))


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=128,
        attention_head_dim=4, norm_num_groups=32,
    )


def train_sd(cfg: DemoConfig, data: Data, vae: AutoencoderKL, tokenizer, log: Log
             ) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    torch.manual_seed(cfg.seed + 3)
    rng = np.random.default_rng(cfg.seed + 3)
    latents_all = encode(vae, data.images)
    text_encoder, unet = make_text_encoder(tokenizer), make_unet()
    noise_sched = DDPMScheduler(**{k: v for k, v in SD_SCHEDULE.items()
                                   if k not in ("set_alpha_to_one", "steps_offset")})
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    sched = cosine_lr(opt, cfg.sd_steps, warmup=200)
    progress = Progress("shapes-sd", cfg.sd_steps, log)
    unet.train()
    text_encoder.train()
    for i in range(cfg.sd_steps):
        idx = torch.from_numpy(rng.integers(len(latents_all), size=cfg.sd_batch))
        latents = latents_all[idx]
        forms = rng.choice(len(PROMPT_FORMS), size=cfg.sd_batch, p=PROMPT_WEIGHTS)
        ids = torch.from_numpy(data.prompt_ids[idx.numpy(), forms])
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (cfg.sd_batch,))
        noisy = noise_sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        progress.step(i, loss.item())
    return text_encoder.eval(), unet.eval()


# ---------------------------------------------------------------- x4 upscaler


def make_upscaler_unet() -> UNet2DConditionModel:
    # No self-attention at full resolution: the upscaler works on 32×32 latents and larger,
    # where attention would cost most and convolutions see what an edge needs.
    return UNet2DConditionModel(
        sample_size=32, in_channels=7, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
        num_class_embeds=MAX_NOISE_LEVEL + 1,
    )


def train_upscaler(cfg: DemoConfig, data: Data, vae: AutoencoderKL,
                   text_encoder: CLIPTextModel, log: Log) -> UNet2DConditionModel:
    torch.manual_seed(cfg.seed + 4)
    rng = np.random.default_rng(cfg.seed + 4)
    mean = encode(vae, data.hires, batch=32)
    # Two degraded inputs per image: as often bicubic as BSR.
    low = torch.stack([to_tensor(np.stack([degrade(img, rng) for img in data.hires]))
                       for _ in range(2)], dim=1)  # M×2×3×32×32
    with torch.no_grad():
        empty = data.hires_prompt_ids.copy()
        empty[:, 1] = empty[:, -1]  # keep <bos>, then <eos>/<pad> only: the empty prompt
        empty[:, 2:] = empty[:, -1:]
        text = {"prompt": text_encoder(torch.from_numpy(data.hires_prompt_ids))[0],
                "empty": text_encoder(torch.from_numpy(empty))[0]}
    unet = make_upscaler_unet()
    noise_sched = DDPMScheduler(**{k: v for k, v in X4_SCHEDULE.items()
                                   if k not in ("set_alpha_to_one", "steps_offset")})
    low_res_sched = DDPMScheduler(**LOW_RES_SCHEDULE)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=1e-2)
    sched = cosine_lr(opt, cfg.x4_steps, warmup=100)
    progress = Progress("shapes-x4", cfg.x4_steps, log)
    c = cfg.x4_crop
    unet.train()
    for i in range(cfg.x4_steps):
        n = cfg.x4_batch
        idx = rng.integers(len(mean), size=n)
        ys, xs = rng.integers(0, mean.shape[-1] - c + 1, size=(2, n))
        latents = torch.stack([mean[idx[k], :, ys[k]:ys[k] + c, xs[k]:xs[k] + c]
                               for k in range(n)])
        variant = rng.integers(2, size=n)
        lr_img = torch.stack([low[idx[k], variant[k], :, ys[k]:ys[k] + c, xs[k]:xs[k] + c]
                              for k in range(n)])
        # Noise levels: mostly small (inference uses ~20), sometimes up to the maximum.
        level = torch.from_numpy(np.where(rng.random(n) < 0.7, rng.integers(0, 60, n),
                                          rng.integers(0, MAX_NOISE_LEVEL + 1, n)))
        lr_noisy = low_res_sched.add_noise(lr_img, torch.randn_like(lr_img), level)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (n,))
        x = torch.cat([noise_sched.add_noise(latents, noise, t), lr_noisy], dim=1)
        cond = torch.where(torch.from_numpy(rng.random(n) < 0.5)[:, None, None],
                           text["prompt"][idx], text["empty"][idx])
        pred = unet(x, t, encoder_hidden_states=cond, class_labels=level).sample
        loss = nn.functional.mse_loss(pred, noise_sched.get_velocity(latents, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        progress.step(i, loss.item())
    return unet.eval()


# ---------------------------------------------------------------- assembly


def _half(*modules: nn.Module) -> None:
    for m in modules:
        m.to(torch.float16)


def train_demo(out: Path, cfg: DemoConfig | None = None, log: Log = print) -> dict[str, Path]:
    """Train all three models into ``out/<id>`` folders; return their paths."""
    cfg = cfg or DemoConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    tok_dir = out / "_tokenizer"
    tokenizer = write_clip_tokenizer(tok_dir, WORDS, model_max_length=MAX_TOKENS)
    data = make_data(cfg, tokenizer, log)
    clf = train_classifier(cfg, data, log)
    vae = train_vae(cfg, data, log)
    text_encoder, unet = train_sd(cfg, data, vae, tokenizer, log)
    x4_unet = train_upscaler(cfg, data, vae, text_encoder, log)
    log(f"[done] trained in {time.monotonic() - t0:.0f}s")

    paths = {"shapes-clf": out / "shapes-clf", "shapes-sd": out / "shapes-sd",
             "shapes-x4": out / "shapes-x4"}
    _half(clf, vae, text_encoder, unet, x4_unet)
    clf.save_pretrained(paths["shapes-clf"], safe_serialization=True)
    save_pipeline(StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULE), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ), paths["shapes-sd"])
    x4_vae = rescale_latents(vae, UPSCALER_SCALING_FACTOR)
    save_pipeline(StableDiffusionUpscalePipeline(
        vae=x4_vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=x4_unet,
        low_res_scheduler=DDPMScheduler(**LOW_RES_SCHEDULE),
        scheduler=DDIMScheduler(**X4_SCHEDULE), max_noise_level=MAX_NOISE_LEVEL,
    ), paths["shapes-x4"])
    (out / "training_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    shutil.rmtree(tok_dir, ignore_errors=True)
    return paths
