"""Memory and speed of an ESD erase on a UNet of Stable Diffusion 1.5's configuration.

    python -m bench.esd_memory                       # CPU: bfloat16, 128² images (16² latents)
    python -m bench.esd_memory --device cuda --dtype float16 --size 512 --iterations 50
    python -m bench.esd_memory --scale small         # a scaled-down UNet: proves the path

The UNet is built from SD 1.5's configuration with random weights (no download), in half
precision as the service loads it on a GPU; a one-layer CLIP text encoder of SD's width and
a VAE with SD's 8× scale stand in for the rest, which an erase barely touches. Per method and
with and without gradient checkpointing, in a process of its own (peaks do not mix):

* the **weights held** by teacher and student together (each storage counted once) against
  one UNet in half precision plus the trained set in float32 — the student shares every
  tensor it does not train with the teacher (``worker.esd.student_unet``);
* Adam's state, the process's peak (CUDA: allocated; CPU: resident set) and what the erase
  adds to the loaded model at its peak (activations, gradients, Adam, the teacher's batches);
* iterations per second, and a plain generation at the same size for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
# The same layout at a tenth of the width: for proving the path on a small machine.
SMALL_UNET = SD15_UNET | {"block_out_channels": (32, 64, 128, 128), "cross_attention_dim": 64}
SCALES = {"sd15": SD15_UNET, "small": SMALL_UNET}
WORDS = "a photo of triangle square circle red blue".split()


def pipeline(scale: str, device: str, dtype: Any) -> Any:
    """A StableDiffusionPipeline around the UNet of ``scale``, random weights in ``dtype``."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from worker.tiny import sd_scheduler
    from worker.tokenizer import write_clip_tokenizer

    config = SCALES[scale]
    # Built on the meta device and materialised in ``dtype``: no float32 copy of 860M
    # parameters passes through memory first.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = unet.to(dtype).to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():  # fan-in scaled normals; norms at 1, biases at 0
        for name, p in unet.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    if any(True for _ in unet.buffers()):
        raise RuntimeError("the UNet has buffers this bench leaves uninitialised")
    width = config["cross_attention_dim"]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_clip_tokenizer(tmp, WORDS)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width,
        num_hidden_layers=1, num_attention_heads=8, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=width))
    vae = AutoencoderKL(block_out_channels=(8,) * 4, norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    return StableDiffusionPipeline(
        unet=unet, vae=vae.to(device, dtype), text_encoder=text_encoder.to(device, dtype),
        tokenizer=tokenizer, scheduler=sd_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


class Peak:
    """The process's memory now and at its peak since ``reset()``: CUDA's allocator, or on
    the CPU the resident set (Linux's VmRSS / VmHWM; writing 5 to clear_refs resets the
    high-water mark)."""

    def __init__(self, device: str):
        self.device = device

    def reset(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def _status(self, key: str) -> int:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    def now(self) -> int:
        import torch

        return (torch.cuda.memory_allocated() if self.device == "cuda"
                else self._status("VmRSS"))

    def peak(self) -> int:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM")


def held_bytes(*modules: Any) -> int:
    """Bytes of the distinct storages behind the modules' parameters and buffers."""
    seen: dict[int, int] = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def measure_erase(scale: str, device: str, dtype_name: str, method: str, checkpointing: bool,
                  size: int, iterations: int, ddim_steps: int) -> dict[str, Any]:
    import torch

    from worker.esd import ESDConfig, ESDTrainer

    dtype = getattr(torch, dtype_name)
    pipe = pipeline(scale, device, dtype)
    mem = Peak(device)
    loaded = mem.now()
    mem.reset()
    cfg = ESDConfig(concepts=("triangle",), method=method, iterations=iterations,
                    learning_rate=1e-5, ddim_steps=ddim_steps, height=size, width=size,
                    block=min(8, iterations), max_rows=8,
                    gradient_checkpointing=checkpointing)
    trainer = ESDTrainer(pipe, cfg)
    unet_numel = sum(p.numel() for p in pipe.unet.parameters())
    trained = sum(p.numel() for p in trainer.params.values())
    t0 = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    adam = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values()
               for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    return {"method": method, "checkpointing": checkpointing,
            "unet_parameters": unet_numel, "trained_parameters": trained,
            "unet_bytes": unet_numel * dtype.itemsize, "trained_fp32_bytes": trained * 4,
            "held_bytes": held_bytes(pipe.unet, trainer.unet), "adam_bytes": adam,
            "loaded_bytes": loaded, "peak_bytes": mem.peak(),
            "it_per_s": iterations / seconds,
            "finite": all(map(math.isfinite, trainer.state.losses))}


def measure_generate(scale: str, device: str, dtype_name: str, size: int, steps: int
                     ) -> dict[str, Any]:
    import torch

    pipe = pipeline(scale, device, getattr(torch, dtype_name))
    pipe.set_progress_bar_config(disable=True)
    mem = Peak(device)
    loaded = mem.now()
    pipe("a triangle", num_inference_steps=2, height=size, width=size)  # warm-up
    mem.reset()
    t0 = time.perf_counter()
    pipe("a triangle", num_inference_steps=steps, height=size, width=size,
         generator=torch.Generator(device).manual_seed(0))
    if device == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "steps": steps, "loaded_bytes": loaded,
            "peak_bytes": mem.peak()}


def run(scale: str = "sd15", device: str = "cpu", dtype: str = "bfloat16", size: int = 128,
        iterations: int = 8, ddim_steps: int = 4, methods: tuple[str, ...] = ("esd-x", "esd-u"),
        generate_steps: int = 30) -> dict[str, Any]:
    """Every configuration in a child process of its own; their results together."""
    common = {"scale": scale, "device": device, "dtype_name": dtype, "size": size}
    jobs: list[tuple[str, dict[str, Any]]] = [
        ("erase", common | {"method": m, "checkpointing": c, "iterations": iterations,
                            "ddim_steps": ddim_steps})
        for m in methods for c in (False, True)]
    jobs.append(("generate", common | {"steps": generate_steps}))
    out: dict[str, Any] = {**common, "iterations": iterations, "ddim_steps": ddim_steps,
                           "erases": []}
    for kind, kwargs in jobs:
        child = subprocess.run(
            [sys.executable, "-m", "bench.esd_memory", "--child", json.dumps([kind, kwargs])],
            capture_output=True, text=True, check=False)
        if child.returncode:
            raise RuntimeError(f"{kind} {kwargs} failed:\n{child.stderr[-3000:]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        if kind == "erase":
            out["erases"].append(result)
        else:
            out["generate"] = result
    return out


def table(r: dict[str, Any]) -> list[str]:
    """The results as markdown rows."""
    gb = 1024 ** 3
    where = "CUDA allocated" if r["device"] == "cuda" else "CPU resident set"
    lines = [
        f"| method | checkpointing | held: teacher + student | one UNet as loaded "
        f"+ trained set fp32 | **held / that** (target ≤ 1.3×) | Adam state | loaded model "
        f"({where}) | peak ({where}) | **erase's addition at peak** | iterations/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in r["erases"]:
        bound = e["unet_bytes"] + e["trained_fp32_bytes"]
        lines.append(
            f"| {e['method']} ({e['trained_parameters'] / 1e6:.1f}M of "
            f"{e['unet_parameters'] / 1e6:.0f}M trained"
            f"{'' if e['finite'] else '; **losses not finite**'}) | "
            f"{'on' if e['checkpointing'] else 'off'}"
            f" | {e['held_bytes'] / gb:.2f} GiB | {bound / gb:.2f} GiB | "
            f"{e['held_bytes'] / bound:.2f}× | {e['adam_bytes'] / gb:.2f} GiB | "
            f"{e['loaded_bytes'] / gb:.2f} GiB | {e['peak_bytes'] / gb:.2f} GiB | "
            f"{(e['peak_bytes'] - e['loaded_bytes']) / gb:.2f} GiB | {e['it_per_s']:.2f} |")
    g = r["generate"]
    lines += ["", f"Generation at {r['size']}² with {g['steps']} DDIM steps (guidance on): "
              f"{g['seconds']:.2f} s, {g['steps'] / g['seconds']:.2f} steps/s, peak "
              f"{g['peak_bytes'] / gb:.2f} GiB ({where}; loaded {g['loaded_bytes'] / gb:.2f} "
              "GiB)."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=list(SCALES), default="sd15")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None,
                        help="default: float16 on CUDA, bfloat16 on the CPU")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--ddim-steps", type=int, default=4,
                        help="the teacher's trajectory steps (ESDConfig.ddim_steps)")
    parser.add_argument("--methods", nargs="+", default=["esd-x", "esd-u"])
    parser.add_argument("--generate-steps", type=int, default=30)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, kwargs = json.loads(args.child)
        fn = measure_erase if kind == "erase" else measure_generate
        print(json.dumps(fn(**kwargs)), flush=True)
        return
    dtype = args.dtype or ("float16" if args.device == "cuda" else "bfloat16")
    r = run(args.scale, args.device, dtype, args.size, args.iterations, args.ddim_steps,
            tuple(args.methods), args.generate_steps)
    print(f"ESD memory: {args.scale} UNet, {args.device}, {dtype}, {args.size}², "
          f"{args.iterations} iterations, trajectories of {args.ddim_steps} DDIM steps")
    print("\n".join(table(r)))
    print(json.dumps(r))


if __name__ == "__main__":
    main()
