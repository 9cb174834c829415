from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from app.errors import InvalidParams
from worker.esd import (
    ESDConfig,
    ESDPrompt,
    ESDTrainer,
    apply_delta,
    encode_prompts,
    esd_target,
    select_parameters,
)
from worker.tiny import tiny_pipeline, tiny_sdxl_pipeline


def test_target_matches_the_paper_on_a_hand_computed_case():
    eps_0, eps_c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    # c_from = c, η = 1: ε₀ − η(ε_c − ε₀) = [1 − 2, 2 − 3]
    assert torch.equal(esd_target(eps_0, eps_c, eps_c, 1.0), torch.tensor([-1.0, -1.0]))
    # erase_from: ε_f − (1 + η)(ε_c − ε₀) = [0 − 1.5·2, 0 − 1.5·3]
    assert torch.equal(esd_target(eps_0, eps_c, torch.zeros(2), 0.5), torch.tensor([-3.0, -4.5]))


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


def test_parameter_sets(pipe):
    x = select_parameters(pipe.unet, "esd-x")
    strict = select_parameters(pipe.unet, "esd-x-strict")
    u = select_parameters(pipe.unet, "esd-u")
    everything = select_parameters(pipe.unet, "esd-all")
    assert x and all(".attn2." in f".{n}" for n in x)
    assert strict and set(strict) < set(x)
    assert all(n.split(".")[-2] in ("to_k", "to_v") for n in strict)
    assert u and not any("attn2" in n for n in u)
    assert any(n.startswith("conv_in") for n in u)
    assert set(x) | set(u) <= set(everything) == {n for n, _ in pipe.unet.named_parameters()}


def test_unknown_method_and_empty_selection_are_clear_errors(pipe):
    with pytest.raises(InvalidParams, match="'esd-q'"):
        select_parameters(pipe.unet, "esd-q")
    no_attention = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
        mid_block_type=None, cross_attention_dim=32,
    )
    with pytest.raises(InvalidParams, match="selects no parameter"):
        select_parameters(no_attention, "esd-x")


def trained(pipe, method: str, iterations: int = 3) -> ESDTrainer:
    cfg = ESDConfig(concepts=("red",), method=method, iterations=iterations,
                    learning_rate=1e-2, ddim_steps=4, seed=1)
    trainer = ESDTrainer(pipe, cfg)
    trainer.train()
    return trainer


@pytest.mark.parametrize(("method", "allowed"), [
    ("esd-x", lambda n: ".attn2." in f".{n}"),
    ("esd-x-strict", lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n),
])
def test_training_changes_only_the_methods_parameters_and_never_the_base(pipe, method, allowed):
    before = copy.deepcopy(pipe.unet.state_dict())
    trainer = trained(pipe, method)
    after = trainer.unet.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "training changed nothing"
    assert all(allowed(n) for n in changed), sorted(changed)[:5]
    # θ*, the pipeline's own UNet, is bit-identical.
    assert all(torch.equal(before[n], v) for n, v in pipe.unet.state_dict().items())


def test_delta_on_the_base_reproduces_the_trained_unet(pipe):
    trainer = trained(pipe, "esd-x")
    delta = trainer.delta()
    assert set(delta) == set(select_parameters(pipe.unet, "esd-x"))
    rebuilt = copy.deepcopy(pipe.unet)
    apply_delta(rebuilt, delta)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trainer.unet(x, 500, encoder_hidden_states=emb).sample
        assert torch.equal(rebuilt(x, 500, encoder_hidden_states=emb).sample, expected)
        assert not torch.equal(pipe.unet(x, 500, encoder_hidden_states=emb).sample, expected)


@pytest.mark.parametrize("method", ["esd-x", "esd-x-strict"])
def test_sdxl_trains_its_cross_attention_only_and_the_delta_reproduces_it(method):
    """SDXL: two text encoders, the pooled embedding and the time ids condition the UNet;
    the method's parameter set and the delta hold as for Stable Diffusion 1.x."""
    xl = tiny_sdxl_pipeline(seed=0)
    before = copy.deepcopy(xl.unet.state_dict())
    trainer = trained(xl, method)
    assert trainer.pooled is not None and trainer.pooled[""].abs().sum() == 0  # zeros, as SDXL
    changed = {n for n, v in trainer.unet.state_dict().items() if not torch.equal(before[n], v)}
    assert changed and changed <= set(select_parameters(xl.unet, method)), sorted(changed)[:5]
    assert all(torch.equal(before[n], v) for n, v in xl.unet.state_dict().items())
    rebuilt = copy.deepcopy(xl.unet)
    apply_delta(rebuilt, trainer.delta())
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = trainer._cond(["a red circle", "a blue square"], torch.float32)
    with torch.no_grad():
        expected = trainer.unet(x, 500, **cond).sample
        assert torch.equal(rebuilt(x, 500, **cond).sample, expected)
        assert not torch.equal(xl.unet(x, 500, **cond).sample, expected)


@pytest.mark.parametrize("build", [tiny_pipeline, tiny_sdxl_pipeline])
def test_lora_parameterization_trains_factors_whose_product_is_the_edit(build):
    """ESD as a LoRA: only rank-r factors train (a delta a fraction of the matrices'), the
    base never moves, and the factors applied to the base reproduce the trained UNet."""
    base = build(seed=0)
    cfg = ESDConfig(concepts=("red",), method="esd-x-strict", iterations=3, learning_rate=1e-2,
                    ddim_steps=4, seed=1, parameterization="lora", lora_rank=2)
    trainer = ESDTrainer(base, cfg)
    trainer.train()
    delta = trainer.delta()
    matrices = select_parameters(base.unet, "esd-x-strict")
    assert {k.rsplit(".lora_", 1)[0] + ".weight" for k in delta} == set(matrices)
    assert all(min(v.shape) == 2 for v in delta.values())
    assert sum(v.numel() for v in delta.values()) < sum(p.numel() for p in matrices.values())
    rebuilt = copy.deepcopy(base.unet)
    apply_delta(rebuilt, delta)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = trainer._cond(["a red circle", "a blue square"], torch.float32)
    with torch.no_grad():
        expected = trainer.unet(x, 500, **cond).sample
        torch.testing.assert_close(rebuilt(x, 500, **cond).sample, expected, atol=1e-5,
                                   rtol=1e-5)  # W₀ + B·A merged vs. beside: rounding only
        assert (base.unet(x, 500, **cond).sample - expected).abs().max() > 1e-2


def test_lora_parameterization_is_refused_for_methods_it_cannot_hold(pipe):
    with pytest.raises(InvalidParams, match="`method` esd-x or esd-x-strict, got 'esd-u'"):
        ESDTrainer(pipe, ESDConfig(concepts=("red",), method="esd-u",
                                   parameterization="lora"))


def test_resuming_from_a_checkpoint_gives_the_same_result(pipe):
    straight = trained(pipe, "esd-x", iterations=4)
    first = trained(pipe, "esd-x", iterations=2)
    ckpt = first.checkpoint()
    resumed = ESDTrainer(pipe, ESDConfig(concepts=("red",), method="esd-x", iterations=4,
                                         learning_rate=1e-2, ddim_steps=4, seed=1))
    resumed.restore(ckpt)
    assert resumed.state.iteration == 2
    resumed.train()
    for name, p in straight.params.items():
        assert torch.equal(p, resumed.params[name]), name


def test_several_stops_per_trajectory_take_fewer_teacher_rows_and_resume_exactly(pipe):
    def cfg(per: int, iterations: int = 8) -> ESDConfig:
        return ESDConfig(concepts=("red",), method="esd-x", iterations=iterations,
                         learning_rate=1e-2, ddim_steps=8, seed=1, block=8,
                         stops_per_trajectory=per)

    rows: list[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    try:
        counts = {}
        for per in (1, 4):
            rows.clear()
            ESDTrainer(pipe, cfg(per)).train()
            counts[per] = sum(rows)
    finally:
        hook.remove()
    # 8 trajectories to each stop against 2 to the furthest of 4 stops (same seeds)
    assert counts[4] < 0.75 * counts[1], counts
    straight = ESDTrainer(pipe, cfg(4, 12))
    straight.train()
    first = ESDTrainer(pipe, cfg(4, 6))
    first.train()
    resumed = ESDTrainer(pipe, cfg(4, 12))
    resumed.restore(first.checkpoint())
    resumed.train()
    assert all(torch.equal(p, resumed.params[n]) for n, p in straight.params.items())
    with pytest.raises(InvalidParams, match="`stops_per_trajectory` must divide"):
        ESDTrainer(pipe, cfg(3))


def test_a_robust_erase_resumed_mid_block_is_bit_identical(pipe):
    def cfg(iterations: int) -> ESDConfig:
        return ESDConfig(concepts=("red",), method="esd-x", iterations=iterations,
                         learning_rate=1e-2, ddim_steps=4, seed=1, block=8, robust=True,
                         robust_steps=2, robust_every=4)

    straight = ESDTrainer(pipe, cfg(10))
    straight.train()
    assert straight.offsets and all(float(d.norm()) > 0 for d in straight.offsets.values())
    first = ESDTrainer(pipe, cfg(6))  # stops mid-round: iterations 4-7 share one offset
    first.train()
    resumed = ESDTrainer(pipe, cfg(10))
    resumed.restore(first.checkpoint())
    resumed.train()
    for name, p in straight.params.items():
        assert torch.equal(p, resumed.params[name]), name
    # and the adversary changed what was learned: a plain run ends elsewhere
    plain = ESDTrainer(pipe, ESDConfig(concepts=("red",), method="esd-x", iterations=10,
                                       learning_rate=1e-2, ddim_steps=4, seed=1, block=4))
    plain.train()
    assert any(not torch.equal(p, plain.params[n]) for n, p in straight.params.items())


def test_a_shared_robust_offset_is_one_for_every_prompt_and_within_its_budget(pipe):
    prompts = tuple(ESDPrompt(p, p) for p in ("red", "a red circle", "a red square"))
    trainer = ESDTrainer(pipe, ESDConfig(concepts=("red",), prompts=prompts, method="esd-x",
                                         iterations=8, learning_rate=1e-2, ddim_steps=4,
                                         seed=1, block=4, robust=True, robust_shared=True,
                                         robust_every=4,
                                         robust_budget=0.1, robust_steps=3, robust_lr=1.0))
    trainer.train()
    [(key, delta)] = trainer.offsets.items()
    # the last block's four iterations (all three prompts) trained under the one offset
    # (the first block's is zero: the student still is the teacher)
    norms = encode_prompts(pipe, ["a red circle", "a red square", "red", "a red circle"])
    norms = norms.flatten(1)
    assert key == "*" and 0 < float(delta.norm()) <= 0.1 * float(norms.norm(dim=1).mean()) \
        * (1 + 1e-5)


def test_the_robust_offset_stays_within_its_budget(pipe):
    trainer = ESDTrainer(pipe, ESDConfig(concepts=("red",), method="esd-x", iterations=4,
                                         learning_rate=1e-2, ddim_steps=4, seed=1, block=4,
                                         robust=True, robust_every=4, robust_budget=0.1,
                                         robust_steps=3, robust_lr=1.0))
    trainer.train()
    [(text, delta)] = trainer.offsets.items()
    bound = 0.1 * float(encode_prompts(pipe, [text])[0].norm())
    assert float(delta.norm()) <= bound * (1 + 1e-5)


def test_preservation_holds_the_neighbours_prediction(pipe):
    def drift(preserve: str | None) -> tuple[float, float]:
        prompts = (ESDPrompt("a red circle", "a red circle", "a circle", preserve),)
        trainer = ESDTrainer(pipe, ESDConfig(concepts=("red",), method="esd-x", iterations=20,
                                             learning_rate=1e-3, ddim_steps=4, seed=1,
                                             prompts=prompts))
        trainer.train()
        x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2))
        out = []
        for text in ("a orange circle", "a red circle"):
            emb = encode_prompts(pipe, [text]).expand(4, -1, -1)
            with torch.no_grad():
                moved = trainer.unet(x, 400, encoder_hidden_states=emb).sample
                base = pipe.unet(x, 400, encoder_hidden_states=emb).sample
            out.append(float((moved - base).pow(2).mean()))
        return out[0], out[1]

    free_kept, free_erased = drift(None)
    held_kept, held_erased = drift("a orange circle")
    # The neighbour moves far less with the term (measured 0.13× its drift without it); the
    # erased prompt still moves (0.51×), so the two kinds of prompt part ways.
    assert held_kept < 0.3 * free_kept, (held_kept, free_kept)
    assert held_erased > 0.3 * free_erased, (held_erased, free_erased)


def test_a_neighbour_can_be_held_at_points_of_its_own_trajectory(pipe):
    prompts = (ESDPrompt("a red circle", "a red circle", "a circle", "a orange circle"),)
    cfg = ESDConfig(concepts=("red",), method="esd-x", iterations=8, learning_rate=1e-3,
                    ddim_steps=4, seed=1, prompts=prompts, preserve_trajectory=True)
    trainer = ESDTrainer(pipe, cfg)
    samples = trainer._draw_block(0)
    # Same noise and stop as the erased prompt's x_t, another prompt guiding the way there:
    # the x_t differ wherever the trajectory took a step.
    assert all(s[4] is not None and s[4].shape == s[0].shape for s in samples)
    assert any(not torch.equal(s[0], s[4]) for s in samples)
    plain = ESDTrainer(pipe, ESDConfig(**{**cfg.__dict__, "preserve_trajectory": False}))
    assert all(s[4] is None for s in plain._draw_block(0))
    assert len(trainer.train().losses) == 8


def test_the_student_holds_only_its_trained_set_and_leaves_the_teacher_as_it_was(pipe):
    flags = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    trainer = trained(pipe, "esd-x", iterations=1)
    teacher = dict(pipe.unet.named_parameters())
    shared = {n for n, p in trainer.unet.named_parameters()
              if p.data_ptr() == teacher[n].data_ptr()}
    # Every tensor outside the trained set is the teacher's own; the trained set is a copy.
    assert shared == set(teacher) - set(trainer.params)
    assert not any(p.requires_grad for n, p in trainer.unet.named_parameters() if n in shared)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in trainer.params.values())
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == flags


def test_a_half_precision_teacher_trains_a_float32_trained_set():
    pipe = tiny_pipeline(seed=0).to(torch.bfloat16)
    before = copy.deepcopy(pipe.unet.state_dict())
    trainer = trained(pipe, "esd-x")
    assert all(torch.isfinite(torch.tensor(trainer.state.losses)))
    moved = [n for n, p in trainer.params.items() if not torch.equal(p.to(torch.bfloat16),
                                                                       before[n])]
    assert moved and all(p.dtype == torch.float32 for p in trainer.params.values())
    assert all(torch.equal(before[n], v) for n, v in pipe.unet.state_dict().items())


def test_gradient_checkpointing_learns_the_same_numbers(pipe):
    plain = trained(pipe, "esd-u")
    cfg = ESDConfig(concepts=("red",), method="esd-u", iterations=3, learning_rate=1e-2,
                    ddim_steps=4, seed=1, gradient_checkpointing=True)
    checkpointed = ESDTrainer(pipe, cfg)
    checkpointed.train()
    assert checkpointed.unet.is_gradient_checkpointing
    assert plain.state.losses == checkpointed.state.losses
    assert all(torch.equal(p, checkpointed.params[n]) for n, p in plain.params.items())


def test_the_teachers_batches_shrink_as_latents_grow_and_robust_rounds_fit_blocks(pipe):
    small = ESDTrainer(pipe, ESDConfig(concepts=("red",), height=32, width=32))
    large = ESDTrainer(pipe, ESDConfig(concepts=("red",), height=1024, width=1024))
    assert small.max_rows == 64 and large.max_rows == 1  # 16² and 512² latents
    with pytest.raises(InvalidParams, match="`robust_every` must divide `block` \\(8\\), got 3"):
        ESDTrainer(pipe, ESDConfig(concepts=("red",), robust=True, robust_every=3))


def test_erasing_to_a_reference_learns_that_models_prediction(pipe):
    """With the model retrained without the concept as the target, the edit's prediction for
    the concept's prompt moves to that model's (through its own text encoder's encoding),
    where ESD's target would take it elsewhere."""
    reference = tiny_pipeline(seed=5)
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        goal = reference.unet(x, 400, encoder_hidden_states=encode_prompts(
            reference, ["red"]).expand(4, -1, -1)).sample

    def distance(to: object) -> float:
        trainer = ESDTrainer(pipe, ESDConfig(concepts=("red",), method="esd-x", iterations=30,
                                             learning_rate=3e-3, ddim_steps=4, seed=1),
                             reference=to)
        trainer.train()
        with torch.no_grad():
            moved = trainer.unet(x, 400, encoder_hidden_states=encode_prompts(
                pipe, ["red"]).expand(4, -1, -1)).sample
        return float((moved - goal).pow(2).mean())

    with torch.no_grad():
        before = float((pipe.unet(x, 400, encoder_hidden_states=encode_prompts(
            pipe, ["red"]).expand(4, -1, -1)).sample - goal).pow(2).mean())
    taught, esd = distance(reference), distance(None)
    # Measured: 0.44× its distance before training, 0.43× where ESD's target takes it.
    assert taught < 0.6 * before, (taught, before)
    assert taught < 0.6 * esd, (taught, esd)
