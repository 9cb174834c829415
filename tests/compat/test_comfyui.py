"""Lethe's exports loaded by ComfyUI's own code (``make test-compat``; see conftest.py).

ComfyUI recognises a checkpoint by its tensors' shapes, so each architecture is built at
full size from the shipped configs (``worker/architectures``), with random weights rounded
to float16 first: the float16 export (Lethe's default) then holds them exactly, and
ComfyUI, computing in float32 on the CPU, must give diffusers' outputs to float rounding.

For each of SD 1.x, 2.x and SDXL: the single-file export is detected as that architecture,
its UNet, text encoders, token ids and VAE agree with diffusers'; the LoRA export of an edit
is applied with no key left unloaded and ComfyUI's patched UNet is the edit's; a checkpoint
ComfyUI saves imports back tensor for tensor. On SD 1.x the edits are real ESD erases (full
and LoRA-parameterised), a few iterations at 64 px; on 2.x and SDXL a low-rank change of
esd-x-strict's matrices (an erase at that size takes minutes a step on two cores).
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from app.registry import Registry
from worker.esd import ESDConfig, ESDTrainer, apply_delta, select_parameters
from worker.exporter import export_lora, export_single_file
from worker.importer import import_model
from worker.lorafiles import read_lora
from worker.singlefile import ARCHITECTURES
from worker.tokenizer import write_clip_vocabulary
from worker.variants import build_variant, save_delta

pytestmark = [pytest.mark.compat, pytest.mark.slow]

# What ComfyUI must take each architecture for (its supported_models classes).
DETECTED = {"sd1": "SD15", "sd2": "SD20", "sdxl": "SDXL"}
PROMPT = "a red circle"
RTOL = 1e-4  # float32 sums in another order; a wrong tensor is off by ~1


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def build(arch: str, folder: Path, seed: int = 0):
    """A full-size pipeline of ``arch`` with random float16-exact weights, on the CPU."""
    import diffusers
    import transformers

    shutil.copytree(ARCHITECTURES / arch, folder)
    index = json.loads((folder / "model_index.json").read_text())
    parts: dict = {}
    torch.manual_seed(seed)
    for name, (library, cls_name) in ((k, v) for k, v in index.items()
                                      if isinstance(v, list)):
        if library is None:  # no safety checker, no feature extractor
            parts[name] = None
            continue
        cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
        sub = folder / name
        if name.startswith("tokenizer"):
            write_clip_vocabulary(sub, ARCHITECTURES / "clip-merges.txt")
            parts[name] = cls.from_pretrained(sub)
        elif name == "scheduler":
            parts[name] = cls.from_pretrained(sub)
        elif library == "diffusers":
            parts[name] = cls.from_config(cls.load_config(sub))
        else:
            parts[name] = cls(cls.config_class.from_pretrained(sub))
    pipe = getattr(diffusers, index["_class_name"])(**parts)
    with torch.no_grad():
        for module in (m for m in pipe.components.values() if isinstance(m, torch.nn.Module)):
            for p in module.parameters():
                p.copy_(p.half().float())
    return pipe.to(torch.float32)


def inputs(pipe, seed: int = 0) -> dict:
    """One noisy latent at 64 px, a timestep and a text conditioning, as both UNets take
    them (SDXL's pooled text and size ids as diffusers' embedding vector, ComfyUI's ``y``)."""
    g = torch.Generator().manual_seed(seed)
    config = pipe.unet.config
    x = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, config.cross_attention_dim, generator=g) * 0.5
    out = {"x": x, "t": torch.tensor([500.0]), "context": context, "added": None, "y": None}
    if config.addition_embed_type == "text_time":
        pooled = torch.randn(1, 1280, generator=g) * 0.5
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        out["added"] = {"text_embeds": pooled, "time_ids": time_ids}
        with torch.no_grad():
            times = pipe.unet.add_time_proj(time_ids.flatten()).reshape(1, -1)
        out["y"] = torch.cat([pooled, times], dim=-1)
    return out


def diffusers_unet(unet, given: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(given["x"], given["t"], encoder_hidden_states=given["context"],
                    added_cond_kwargs=given["added"]).sample


def comfy_unet(patcher, given: dict) -> torch.Tensor:
    with torch.inference_mode():
        return patcher.model.diffusion_model(given["x"], timesteps=given["t"],
                                             context=given["context"], y=given["y"])


def moved(pipe, seed: int = 1) -> dict[str, torch.Tensor]:
    """esd-x-strict's matrices moved by a rank-4 change: an edit without the training."""
    g = torch.Generator().manual_seed(seed)
    delta = {}
    for name, p in select_parameters(pipe.unet, "esd-x-strict").items():
        change = torch.randn(p.shape[0], 4, generator=g) @ torch.randn(4, p.shape[1],
                                                                       generator=g)
        delta[name] = p.detach() + 0.02 * change
    return delta


def erased(pipe, parameterization: str) -> dict[str, torch.Tensor]:
    """A real ESD erase of 'red', a few iterations at 64 px (a learning rate that moves
    the UNet measurably in so few)."""
    # esd-x-strict (shapes-sd's default): matrices only, which a LoRA holds whole; esd-x
    # also trains a bias, which none can
    cfg = ESDConfig(concepts=("red",), method="esd-x-strict", iterations=4,
                    learning_rate=3e-2 if parameterization == "lora" else 3e-3, ddim_steps=3,
                    height=64, width=64, seed=0, parameterization=parameterization,
                    lora_rank=4)
    trainer = ESDTrainer(pipe, cfg)
    trainer.train()
    return trainer.delta()


class Built:
    """One architecture: its registry, exports, and diffusers' answers to compare with."""

    def __init__(self, arch: str, root: Path):
        self.arch, self.root = arch, root
        self.registry = Registry(root / "registry")
        pipe = build(arch, root / "config")
        self.inputs = inputs(pipe)
        self.unet = diffusers_unet(pipe.unet, self.inputs)
        self.text = self._encode(pipe)
        # ComfyUI's name for each text encoder -> diffusers' tokenizer ids of the prompt
        names = {"sd1": ("l",), "sd2": ("h",), "sdxl": ("l", "g")}[arch]
        tokenizers = (pipe.tokenizer, getattr(pipe, "tokenizer_2", None))
        self.token_ids = {name: tokenizer(PROMPT, padding="max_length", max_length=77
                                          ).input_ids
                          for name, tokenizer in zip(names, tokenizers, strict=False)}
        self.latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            image = pipe.vae.decode(self.latent).sample
        self.image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        self.edits: dict[str, torch.Tensor] = {}  # edit id -> diffusers' UNet output
        edits = ({"esd": erased(pipe, "full"), "esd-lora": erased(pipe, "lora")}
                 if arch == "sd1" else {"moved": moved(pipe)})
        for name, delta in edits.items():
            self.edits[name] = diffusers_unet(build_variant(pipe, delta, arch).pipe.unet,
                                              self.inputs)
        # Half precision holds these weights exactly (and halves SDXL's memory from here).
        with self.registry.create(arch, {"kind": "text-to-image", "format": "diffusers",
                                         "pipeline": type(pipe).__name__}) as staging:
            pipe.to(torch.float16).save_pretrained(staging, safe_serialization=True)
        del pipe
        gc.collect()
        for name, delta in edits.items():
            manifest = {"kind": "text-to-image", "format": "delta",
                        "base": {"id": arch, "digest": self.registry.get(arch)["digest"]}}
            with self.registry.create(name, manifest) as staging:
                save_delta(delta, staging)
        del edits
        gc.collect()
        self.file = export_single_file(self.registry, arch, root / f"{arch}.safetensors")
        self.loras = {name: export_lora(self.registry, name, root / f"{name}.safetensors")
                      for name in self.edits}
        self.peft = export_lora(self.registry, next(iter(self.edits)),
                                root / "peft.safetensors", layout="peft")
        # What each LoRA file holds, applied by diffusers: its factors exactly (the export
        # keeps 99 % of the change's energy, so this is near the edit, not the edit).
        self.lora_exact = {}
        for name, file in self.loras.items():
            unet = UNet2DConditionModel.from_pretrained(self.registry.path(arch) / "unet",
                                                        torch_dtype=torch.float32)
            with safe_open(str(file), "pt") as f:
                delta, _ = read_lora({k: f.get_tensor(k) for k in f.keys()},  # noqa: SIM118
                                     f.metadata(), unet)
            apply_delta(unet, delta)
            self.lora_exact[name] = diffusers_unet(unet, self.inputs)
            del unet
            gc.collect()

    @staticmethod
    def _encode(pipe) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            if pipe.unet.config.addition_embed_type == "text_time":
                cond, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu",
                                                        do_classifier_free_guidance=False)
                return cond, pooled
            cond, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=False)
            return cond, None


@pytest.fixture(scope="module", params=list(DETECTED))
def built(request, tmp_path_factory, comfy):
    """An architecture built and exported, and ComfyUI's load of the export: (what was
    built, {model, clip, vae}; the last test empties it to free the memory)."""
    made = Built(request.param, tmp_path_factory.mktemp(request.param))
    # SDXL: ComfyUI's own --fp16-unet (weights kept in float16, computed in float32 on
    # the CPU), or its float32 copy beside the loaded file outgrows 24 GB.
    comfy.cli_args.args.fp16_unet = made.arch == "sdxl"
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(made.file), output_vae=True, output_clip=True, embedding_directory=None)
    loaded = {"model": model, "clip": clip, "vae": vae}
    del model, clip, vae
    yield made, loaded
    loaded.clear()
    comfy.model_management.unload_all_models()  # what encoding and decoding loaded
    gc.collect()


def test_the_single_file_export_is_detected_and_draws_as_diffusers(built, comfy):
    made, loaded = built
    model, clip, vae = loaded["model"], loaded["clip"], loaded["vae"]
    assert type(model.model.model_config).__name__ == DETECTED[made.arch]
    unet = relative(comfy_unet(model, made.inputs), made.unet)
    tokens = clip.tokenize(PROMPT)
    assert {name: [t for t, _ in tokens[name][0]] for name in tokens} == made.token_ids
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        image = vae.decode(made.latent)
    text, vae_rel = relative(cond, made.text[0]), relative(image, made.image)
    pooled_rel = relative(pooled, made.text[1]) if made.text[1] is not None else 0.0
    print(f"\n{made.arch}: detected {DETECTED[made.arch]}; relative differences to "
          f"diffusers: UNet {unet:.1e}, text {text:.1e}, pooled {pooled_rel:.1e}, "
          f"VAE {vae_rel:.1e}")
    assert max(unet, text, pooled_rel, vae_rel) < RTOL


def test_every_lora_key_loads_and_the_patched_unet_is_the_edit(built, comfy, caplog):
    made, loaded = built
    model, clip = loaded["model"], loaded["clip"]
    base = comfy_unet(model, made.inputs)
    for name, wanted in made.edits.items():
        lora = comfy.utils.load_torch_file(str(made.loras[name]))
        assert all(k.startswith("lora_unet_") for k in lora)
        with caplog.at_level(logging.WARNING), torch.inference_mode():
            caplog.clear()
            patched, _ = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
        assert [r.message for r in caplog.records if "lora key not loaded" in r.message] == []
        with torch.inference_mode():
            patched.patch_model()
        try:
            got = comfy_unet(patched, made.inputs)
        finally:
            with torch.inference_mode():
                patched.unpatch_model()
        print(f"\n{made.arch} {name}: ComfyUI-patched vs the file's factors "
              f"{relative(got, made.lora_exact[name]):.1e}, vs the edit "
              f"{relative(got, wanted):.1e}; the base vs the edit {relative(base, wanted):.1e}")
        # ComfyUI applies what the file holds, at strength 1.0 as written, fp16 rounding
        # of SDXL's patched weights aside
        assert relative(got, made.lora_exact[name]) < (3e-3 if made.arch == "sdxl" else RTOL)
        assert relative(got, wanted) < relative(base, wanted) / 3, name  # it is the edit


def test_a_peft_layout_lora_is_ignored_by_this_comfyui_without_an_error(built, comfy, caplog):
    """Why the kohya layout is the default: this ComfyUI reads no key of diffusers' PEFT
    layout, and says so only in its log."""
    made, loaded = built
    lora = comfy.utils.load_torch_file(str(made.peft))
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        caplog.clear()
        comfy.sd.load_lora_for_models(loaded["model"], loaded["clip"], lora, 1.0, 1.0)
    ignored = [r.message for r in caplog.records if "lora key not loaded" in r.message]
    print(f"\n{made.arch} peft layout: {len(ignored)} of {len(lora)} keys not loaded")
    assert len(ignored) == len(lora)


def test_a_checkpoint_comfyui_saved_imports_back_tensor_for_tensor(built, comfy):
    from safetensors import safe_open

    made, loaded = built
    saved = made.root / "comfy-saved.safetensors"
    with torch.inference_mode():
        comfy.sd.save_checkpoint(str(saved), loaded["model"], loaded["clip"], loaded["vae"])
    loaded.clear()  # ComfyUI's copy goes before the import loads another
    comfy.model_management.unload_all_models()
    gc.collect()
    back_id = f"{made.arch}-from-comfy"
    import_model(made.registry, saved, back_id)
    saved.unlink()
    compared = worst = 0.0
    original, back = made.registry.path(made.arch), made.registry.path(back_id)
    for file in sorted(original.glob("*/*.safetensors")):
        with safe_open(str(file), "pt") as a, safe_open(
                str(back / file.relative_to(original)), "pt") as b:
            names = set(b.keys())
            for key in a.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                if key in names:
                    compared += 1
                    worst = max(worst, float((a.get_tensor(key).float()
                                              - b.get_tensor(key).float()).abs().max()))
    total = sum(len(safe_open(str(f), "pt").keys()) for f in original.glob("*/*.safetensors"))
    assert compared >= 0.99 * total  # SD 2.x's export pads a text layer diffusers drops
    assert worst == 0.0
