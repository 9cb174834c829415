"""LoRA files in the layouts other tools write and read: Lethe's exports as diffusers'
own loader applies them, and files other tools wrote read back as the edit they make."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.errors import InvalidParams
from worker.esd import full_delta, select_parameters
from worker.lora import lora_of_edit
from worker.lorafiles import kohya_names, read_lora, write_layout
from worker.tiny import tiny_pipeline, tiny_sdxl_pipeline
from worker.variants import build_variant

BUILDERS = {"sd1": tiny_pipeline, "sdxl": tiny_sdxl_pipeline}


def moved(pipe, method: str, true_rank: int = 2, seed: int = 0, mixed: bool = False
          ) -> dict[str, torch.Tensor]:
    """``method``'s weights moved by a difference of ``true_rank`` each (kernels too);
    ``mixed``: of rank 1 and ``true_rank`` by turns."""
    g = torch.Generator().manual_seed(seed)
    delta = {}
    for i, (name, p) in enumerate(select_parameters(pipe.unet, method).items()):
        if not name.endswith(".weight") or p.dim() not in (2, 4):
            continue
        flat = p.detach().flatten(1)
        r = 1 if mixed and i % 2 else true_rank
        diff = torch.randn(flat.shape[0], r, generator=g) @ torch.randn(
            r, flat.shape[1], generator=g)
        delta[name] = p.detach() + 0.05 * diff.reshape(p.shape)
    return delta


def unet_out(pipe, seed: int = 0) -> torch.Tensor:
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    kwargs = {}
    if pipe.unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(1, pipe.unet.config.projection_class_embeddings_input_dim
                                       - 6 * pipe.unet.config.addition_time_embed_dim),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])}
    context = torch.randn(1, 7, pipe.unet.config.cross_attention_dim,
                          generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        return pipe.unet(x, 10, encoder_hidden_states=context, **kwargs).sample


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_an_export_file_put_on_the_base_by_diffusers_draws_as_the_edit(arch, layout, tmp_path):
    pipe = BUILDERS[arch](seed=0)
    # convolutions and projections, not only attention; ranks 1 and 3 picked by energy
    delta = moved(pipe, "esd-u", true_rank=3, mixed=True)
    edited = unet_out(build_variant(pipe, delta, "base").pipe)
    export = lora_of_edit(pipe.unet, delta, energy=0.999999)
    assert set(export.ranks.values()) == {1, 3}
    assert any(d.dim() == 4 for d, _ in export.factors.values())  # kernels are held too
    path = tmp_path / "edit.safetensors"
    save_file(write_layout(export.factors, layout, pipe.unet), str(path))
    fresh = BUILDERS[arch](seed=0)
    base = unet_out(fresh)
    fresh.load_lora_weights(str(path))
    assert relative(unet_out(fresh), edited) < 1e-4 < relative(base, edited)


def test_kohya_names_are_diffusers_for_sd1_and_the_original_unet_for_sdxl():
    sd1 = kohya_names(tiny_pipeline(seed=0).unet)
    assert sd1["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k")
    sdxl = kohya_names(tiny_sdxl_pipeline(seed=0).unet)
    name = sdxl["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert name.startswith("lora_unet_input_blocks_") and name.endswith("_attn2_to_k")
    assert all(n.startswith("lora_unet_") for n in sdxl.values())


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_reading_an_export_back_gives_the_edit(arch, layout):
    pipe = BUILDERS[arch](seed=0)
    delta = moved(pipe, "esd-x-strict")
    export = lora_of_edit(pipe.unet, delta, rank=2)
    tensors = {k: v.half() for k, v in write_layout(export.factors, layout, pipe.unet).items()}
    read, info = read_lora(tensors, {}, pipe.unet)
    assert info["layout"] == layout and info["ranks"] == [2]
    merged = full_delta(pipe.unet, read)
    assert sorted(merged) == sorted(delta)
    for name, value in delta.items():
        torch.testing.assert_close(merged[name], value, atol=2e-3, rtol=1e-3)


def test_a_kohya_alpha_below_the_rank_scales_the_change():
    pipe = tiny_pipeline(seed=0)
    export = lora_of_edit(pipe.unet, moved(pipe, "esd-x-strict"), rank=2)
    tensors = write_layout(export.factors, "kohya", pipe.unet)
    halved = {k: (v / 2 if k.endswith(".alpha") else v) for k, v in tensors.items()}
    full, _ = read_lora(tensors, {}, pipe.unet)
    half, _ = read_lora(halved, {}, pipe.unet)
    for key in (k for k in full if k.endswith("lora_B.weight")):
        torch.testing.assert_close(half[key], full[key] / 2)


def test_files_other_tools_wrote_read_as_what_diffusers_applies(tmp_path):
    """diffusers' save_lora_weights (PEFT, its adapter metadata with lora_alpha ≠ r), peft's
    get_peft_model_state_dict (no prefix) and the old attention-processor layout."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_pipeline(seed=0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_v", "to_q", "to_out.0"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    wanted = unet_out(pipe)
    state = get_peft_model_state_dict(pipe.unet)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=state,
        unet_lora_adapter_metadata={"r": 2, "lora_alpha": 4,
                                    "target_modules": ["to_k", "to_v", "to_q", "to_out.0"]})
    from safetensors import safe_open

    file = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    base = tiny_pipeline(seed=0)
    for tensors, meta in ((load_file(str(file)), metadata), (state, {"lora_adapter_metadata":
                          '{"r": 2, "lora_alpha": 4}'})):
        read, _ = read_lora(tensors, meta, base.unet)
        assert relative(unet_out(build_variant(base, read, "b").pipe), wanted) < 1e-5
    # diffusers' older layout: attn1.processor.to_q_lora.down.weight, to_out_lora → to_out.0
    old = {}
    for key, value in state.items():
        module, factor = key.rsplit(".lora_", 1)
        head, proj = module.rsplit(".", 1) if not module.endswith("to_out.0") else (
            module.removesuffix(".to_out.0"), "to_out")
        part = "down" if factor.startswith("A") else "up"
        old[f"unet.{head}.processor.{proj}_lora.{part}.weight"] = value * (
            2.0 if part == "up" else 1.0)  # no alpha there: scale 1 folded in
    read, info = read_lora(old, {}, base.unet)
    assert info["layout"] == "peft"
    assert relative(unet_out(build_variant(base, read, "b").pipe), wanted) < 1e-5


def test_keys_that_fit_no_module_are_refused_by_name():
    pipe = tiny_pipeline(seed=0)
    export = lora_of_edit(pipe.unet, moved(pipe, "esd-x-strict"), rank=2)
    tensors = write_layout(export.factors, "kohya", pipe.unet)
    stray = "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"
    with pytest.raises(InvalidParams, match="match no module.*down_blocks_7"):
        read_lora(tensors | {stray: torch.zeros(2, 4)}, {}, pipe.unet)
    with pytest.raises(InvalidParams, match="text encoder.*lora_te_text_model"):
        read_lora(tensors | {"lora_te_text_model_encoder_layers_0_self_attn_q_proj"
                             ".lora_down.weight": torch.zeros(2, 32)}, {}, pipe.unet)
    with pytest.raises(InvalidParams, match="match no module.*hada_w1_a"):
        read_lora(tensors | {"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2)}, {}, pipe.unet)
    # an SDXL LoRA on SD 1.x: names it shares, shapes it does not
    sdxl = tiny_sdxl_pipeline(seed=0)
    other = write_layout(lora_of_edit(sdxl.unet, moved(sdxl, "esd-x-strict"), rank=2).factors,
                         "peft", sdxl.unet)
    with pytest.raises(InvalidParams, match="another architecture"):
        read_lora(other, {}, pipe.unet)
    half = {k: v for k, v in tensors.items() if not k.endswith("lora_up.weight")}
    with pytest.raises(InvalidParams, match="half of the factors"):
        read_lora(half, {}, pipe.unet)
