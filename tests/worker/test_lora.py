"""An edit exported as a LoRA that diffusers' own loader applies."""

from __future__ import annotations

import pytest
import torch

from app.errors import InvalidParams
from worker.esd import select_parameters
from worker.lora import lora_from_delta
from worker.tiny import tiny_pipeline


def edited(pipe, true_rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """esd-x-strict's parameters moved by a difference of ``true_rank`` each."""
    g = torch.Generator().manual_seed(seed)
    delta = {}
    for name, p in select_parameters(pipe.unet, "esd-x-strict").items():
        out_f, in_f = p.shape
        diff = torch.randn(out_f, true_rank, generator=g) @ torch.randn(true_rank, in_f,
                                                                         generator=g)
        delta[name] = p.detach() + 0.05 * diff
    return delta


def test_a_lora_of_enough_rank_reproduces_the_edit_through_load_lora_weights():
    pipe = tiny_pipeline(seed=0)
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    delta = edited(pipe, true_rank=2)
    export = lora_from_delta(base, delta, rank=4)
    assert set(export.ranks.values()) == {4}  # as asked: two of them carry nothing
    assert min(export.kept_energy.values()) > 0.9999 and not export.left_out
    pipe.load_lora_weights(export.state_dict)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    merged = dict(pipe.unet.named_parameters())
    for name, value in delta.items():
        torch.testing.assert_close(merged[name].detach(), value, atol=1e-5, rtol=1e-4)


def test_the_energy_threshold_picks_the_rank_and_a_low_rank_keeps_less():
    pipe = tiny_pipeline(seed=0)
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    delta = edited(pipe, true_rank=3)
    picked = lora_from_delta(base, delta, energy=0.999999)
    assert set(picked.ranks.values()) == {3}
    one = lora_from_delta(base, delta, rank=1)
    assert max(one.kept_energy.values()) < 0.99
    # A bias changes too (esd-x trains to_out.0's): named as what a LoRA cannot hold.
    name = next(n for n in base if n.endswith("attn2.to_out.0.bias"))
    with_bias = lora_from_delta(base, delta | {name: base[name] + 1.0}, rank=3)
    assert with_bias.left_out == [name]
    with pytest.raises(InvalidParams, match="rank"):
        lora_from_delta(base, delta, rank=0)
