from __future__ import annotations

import json

import pytest
import torch

from app.config import Settings
from tests.support import own_storage
from worker.context import WorkerContext
from worker.esd import ESDConfig, ESDTrainer
from worker.tiny import tiny_pipeline, tiny_sdxl_pipeline
from worker.variants import build_variant, save_delta


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def edit(request):
    """A tiny base and a trained esd-x edit of it: Stable Diffusion 1.x and SDXL."""
    pipe = {"sd1": tiny_pipeline, "sdxl": tiny_sdxl_pipeline}[request.param](seed=0)
    trainer = ESDTrainer(pipe, ESDConfig(concepts=("red",), iterations=2, learning_rate=1e-2,
                                         ddim_steps=4, seed=0))
    trainer.train()
    return pipe, trainer


def test_variant_shares_unchanged_tensors_and_reproduces_the_edit(edit):
    pipe, trainer = edit
    delta = trainer.delta()
    loaded = build_variant(pipe, delta, "base")
    variant = loaded.pipe
    base_params = dict(pipe.unet.named_parameters())
    for name, p in variant.unet.named_parameters():
        shared = p.data_ptr() == base_params[name].data_ptr()
        assert shared == (name not in delta), name
    assert variant.text_encoder is pipe.text_encoder and variant.vae is pipe.vae
    assert loaded.bytes == sum(t.numel() * t.element_size() for t in delta.values())
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = trainer._cond(["a red circle"], torch.float32)  # SDXL's pooled and time ids too
    with torch.no_grad():
        assert torch.equal(variant.unet(x, 10, **cond).sample,
                           trainer.unet(x, 10, **cond).sample)
        # The base still answers as before the edit.
        assert torch.equal(pipe.unet(x, 10, **cond).sample, trainer.frozen(x, 10, **cond).sample)


def context_with_edit(home, trainer) -> WorkerContext:
    """A worker context whose registry holds the tiny base and the edit as "base-no-red"."""
    ctx = WorkerContext.from_settings(Settings(home=home, device="cpu", dtype="float32",
                                               **own_storage()))
    with ctx.registry.create("base", {"kind": "text-to-image", "format": "diffusers",
                                      "base": None}) as staging:
        trainer.pipe.save_pretrained(staging, safe_serialization=True)
    manifest = {"kind": "text-to-image", "format": "delta",
                "base": {"id": "base", "digest": ctx.registry.get("base")["digest"]}}
    with ctx.registry.create("base-no-red", manifest) as staging:
        save_delta(trainer.delta(), staging)
    return ctx


def test_cache_serves_variant_from_cached_base_without_reloading_it(edit, tmp_path):
    _, trainer = edit
    ctx = context_with_edit(tmp_path, trainer)

    ctx.cache.get("base")
    assert ctx.cache.stats.loads == 1
    for _ in range(3):
        ctx.cache.get("base-no-red")
        ctx.cache.get("base")
    assert ctx.cache.stats.loads == 2  # the base once, the variant once
    assert ctx.cache.size_of("base-no-red") < ctx.cache.size_of("base") / 5
    ctx.cache.discard("base")
    assert "base-no-red" not in ctx.cache  # a variant never outlives its base's tensors


def test_export_merges_the_delta_into_a_folder_plain_diffusers_loads(edit, tmp_path):
    from diffusers import DiffusionPipeline

    from app.errors import InvalidParams, ModelExists
    from worker.exporter import export_model

    _, trainer = edit
    ctx = context_with_edit(tmp_path, trainer)

    out = export_model(ctx.registry, "base-no-red", tmp_path / "exported")
    exported = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    served, _ = ctx.cache.get("base-no-red")

    def image(pipe):
        return pipe("red circle", num_inference_steps=3, height=32, width=32,
                    generator=torch.Generator().manual_seed(7), output_type="np").images

    assert torch.equal(torch.from_numpy(image(exported)), torch.from_numpy(image(served)))
    base, _ = ctx.cache.get("base")
    assert not torch.equal(torch.from_numpy(image(exported)), torch.from_numpy(image(base)))
    assert (out / "lethe.json").is_file()
    assert not any(p.name.startswith(".exported") for p in tmp_path.iterdir())

    with pytest.raises(ModelExists, match="exists already"):
        export_model(ctx.registry, "base-no-red", out)
    with pytest.raises(InvalidParams, match="`dtype` 'int8'"):
        export_model(ctx.registry, "base-no-red", tmp_path / "other", dtype="int8")


def test_an_edit_exports_as_a_lora_file_its_base_loads(edit, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    from app.cli import main
    from app.config import get_settings

    _, trainer = edit
    ctx = context_with_edit(tmp_path, trainer)
    monkeypatch.setenv("LETHE_HOME", str(tmp_path))  # `lethe models` reads this registry
    monkeypatch.setenv("LETHE_STORAGE_URL", ctx.settings.storage_url)
    get_settings.cache_clear()
    monkeypatch.setattr("app.config.get_settings", get_settings)
    out = tmp_path / "no-red.safetensors"
    main(["models", "export", "base-no-red", "--to", str(out), "--format", "lora",
          "--rank", "1000"])  # past every matrix's size: the whole difference
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    # esd-x also trains to_out.0's bias, which no LoRA holds: the file says so.
    assert all(name.endswith(".bias") for name in json.loads(meta["left_out"]))
    assert min(json.loads(meta["kept_energy"]).values()) > 0.999
    pipe = DiffusionPipeline.from_pretrained(ctx.registry.path("base"), local_files_only=True)
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    merged = dict(pipe.unet.named_parameters())
    for name, value in trainer.delta().items():
        if name.endswith(".weight"):  # fp16 factors: close, not equal
            torch.testing.assert_close(merged[name].detach(), value, atol=2e-3, rtol=1e-2)
    with pytest.raises(SystemExit, match="not an edit"):
        main(["models", "export", "base", "--to", str(tmp_path / "x.safetensors"),
              "--format", "lora"])
    get_settings.cache_clear()


def test_an_edit_trained_as_lora_serves_and_exports_at_its_own_rank():
    """A LoRA-trained edit stores factors only; served, it is W₀ + B·A on the cached base's
    tensors, and its LoRA export at its own rank keeps all of its change."""
    from worker.lora import lora_of_edit

    pipe = tiny_pipeline(seed=0)
    trainer = ESDTrainer(pipe, ESDConfig(concepts=("red",), method="esd-x-strict",
                                         iterations=2, learning_rate=1e-2, ddim_steps=4,
                                         parameterization="lora", lora_rank=2))
    trainer.train()
    delta = trainer.delta()
    variant = build_variant(pipe, delta, "base").pipe
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = trainer._cond(["a red circle"], torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(variant.unet(x, 10, **cond).sample,
                                   trainer.unet(x, 10, **cond).sample, atol=1e-5, rtol=1e-5)
    export = lora_of_edit(pipe.unet, delta, rank=2)
    assert set(export.ranks.values()) == {2}
    assert min(export.kept_energy.values()) > 0.9999
