"""The attacks on an erased concept, on the tiny model: what each may change and what it
must leave alone (their rates mean nothing here; ``shapes-sd`` measures those)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.errors import InvalidParams
from app.jobspecs import AttackSpec
from worker.attacks import TOKEN, Attacker, Drawing, ddim_invert, judged, worst_rate
from worker.esd import ESDConfig, ESDTrainer
from worker.tiny import tiny_pipeline, tiny_sdxl_pipeline
from worker.variants import build_variant

SMALL = AttackSpec(train_images=4, judge_images=2, batch=2, tokens=[1], inversion_steps=3,
                   budgets=[0.5], conditioning_steps=3, relearn_steps=[1, 2], search_words=2,
                   search_images=1, search_worst=1)
TEXTS = ["a red", "a photo of a red", "red in a field"]


class DarkShare:
    """A stand-in judge for the tiny model (it has none): the share of dark images."""

    def judge(self, images: np.ndarray, prompts: list[str]) -> dict:
        return {"hits": {"dark": [bool(im.mean() < 128) for im in images]}}


@pytest.fixture(scope="module")
def pipes():
    return tiny_edit()


def tiny_edit():
    """The tiny base, its ESD edit of "red" and the parameters the edit trained."""
    base = tiny_pipeline(seed=0)
    trainer = ESDTrainer(base, ESDConfig(concepts=("red",), iterations=2, block=2))
    trainer.train()
    delta = trainer.delta()
    return base, build_variant(base, delta, "tiny").pipe, sorted(delta)


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.clone() for part in ("unet", "text_encoder")
            for k, v in getattr(pipe, part).state_dict().items()}


def unchanged(pipe, before: dict[str, torch.Tensor]) -> bool:
    after = snapshot(pipe)
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k])
                                                 for k in before)


def attacker(pipes, cfg: AttackSpec = SMALL) -> Attacker:
    base, edited, trained = pipes
    return Attacker(base, edited, "red", TEXTS, judged(DarkShare(), "red"), cfg,
                    Drawing(steps=2), trained=trained)


def test_the_inversion_trains_only_its_new_rows(pipes):
    base, edited, _ = pipes
    before = snapshot(edited)
    table = edited.text_encoder.get_input_embeddings().weight.detach().clone()
    rate, view = attacker(pipes, SMALL.model_copy(update={"tokens": [2]})
                          ).inversion(edited, 2)
    assert rate is not None and 0.0 <= rate <= 1.0
    learned = view.text_encoder.get_input_embeddings().weight.detach().float()
    ids = view.tokenizer.convert_tokens_to_ids([TOKEN.format(0), TOKEN.format(1)])
    assert ids == [len(table), len(table) + 1] and len(learned) == len(table) + 2
    assert torch.equal(learned[:len(table)], table.float())  # every old row as it was
    start = table.float().mean(0)
    assert all(not torch.allclose(learned[i], start) for i in ids)  # the new ones moved
    assert unchanged(edited, before) and len(edited.tokenizer) == len(table)


def test_the_conditioning_attack_changes_nothing_in_the_model(pipes):
    base, edited, _ = pipes
    before = snapshot(edited)
    rate = attacker(pipes).conditioning(edited, 0.5)
    assert rate is not None
    assert unchanged(edited, before)
    assert all(p.grad is None for p in edited.unet.parameters())


def test_relearning_tunes_a_copy_of_the_edits_parameters(pipes):
    base, edited, _ = pipes
    before = snapshot(edited)
    curve = attacker(pipes).relearning(edited)
    assert [c["steps"] for c in curve] == [1, 2]
    assert unchanged(edited, before)


def test_the_image_inversion_changes_nothing_in_the_model(pipes):
    base, edited, _ = pipes
    before, base_before = snapshot(edited), snapshot(base)
    rates = [attacker(pipes).image_inversion(edited, w) for w in ("empty", "concept")]
    assert all(r is not None and 0.0 <= r <= 1.0 for r in rates)
    assert unchanged(edited, before) and unchanged(base, base_before)


def test_ddim_inversion_returns_the_noise_a_trained_model_draws_an_image_from():
    """On the shipped shapes-sd (a trained model: the sampler's ODE is smooth enough to run
    backwards), an image it drew, inverted to noise and drawn again, comes back."""
    from diffusers import StableDiffusionPipeline

    from worker.domains.shapes.domain import DEMO_DIR
    from worker.esd import encode_prompts
    from worker.pipelines import with_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(DEMO_DIR / "shapes-sd", safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    draw = with_scheduler(pipe, "ddim")
    drawn = draw(prompt=["a red triangle"] * 2, num_inference_steps=30, guidance_scale=4.0,
                 height=32, width=32, output_type="latent",
                 generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    cond = encode_prompts(pipe, ["a red"] * 2)
    noise = ddim_invert(pipe, drawn, cond, 30)
    assert 0.8 < float(noise.std()) < 1.2  # noise-like, not the image scaled
    again = draw(prompt_embeds=cond, latents=noise, num_inference_steps=30, guidance_scale=1.0,
                 output_type="latent").images
    error = float((again - drawn).abs().mean() / drawn.abs().mean())
    assert error < 0.15, error  # 0.07 measured here


def test_a_whole_report_on_the_edit_and_the_base(pipes):
    report = attacker(pipes).run()
    assert set(report) >= {"plain", "inversion", "conditioning", "relearning",
                           "prompt_search", "image_inversion", "worst", "settings"}
    assert [r["prompt"] for r in report["image_inversion"]] == ["empty", "concept"]
    assert report["conditioning"][0]["budget"] == 0.5
    assert report["prompt_search"]["edit"]["tried"] == 3  # two words and the concept twice
    assert report["worst"] == worst_rate(report)
    assert report["settings"]["inversion_steps"] == 3


def test_a_missing_judge_gives_no_rate_and_sdxl_is_refused(pipes):
    assert judged(None, "red")(np.zeros((2, 8, 8, 3), np.uint8)) is None
    sdxl = tiny_sdxl_pipeline(seed=0)
    with pytest.raises(InvalidParams, match="SDXL"):
        Attacker(sdxl, sdxl, "red", TEXTS, judged(None, "red"), SMALL)
    with pytest.raises(InvalidParams, match="`attacks`"):
        Attacker(pipes[0], pipes[1], "red", TEXTS, judged(None, "red"),
                 AttackSpec.model_construct(attacks=["jailbreak"]))


def test_without_the_control_the_base_is_not_attacked(pipes):
    report = attacker(pipes, SMALL.model_copy(update={"control": False,
                                                      "attacks": ["conditioning"]})).run()
    assert report["plain"]["base"] is None and report["conditioning"][0]["base"] is None
    assert report["plain"]["edit"] is not None and "inversion" not in report
