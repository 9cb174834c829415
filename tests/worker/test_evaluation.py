"""The evaluation job's building blocks (end to end: test_evaluate_e2e.py)."""

from __future__ import annotations

from tests.worker.test_features import clip_folder  # noqa: F401  (a fixture)


def test_what_the_worker_publishes_is_what_its_domains_draw_and_the_api_reads(tmp_path):
    from app.jobspecs import GENERIC_OFFER
    from app.registry import Registry
    from worker.domains import get_domain, published

    info = published()
    assert {"generic", "shapes"} <= set(info)
    for name, facts in info.items():
        domain = get_domain(name)
        assert {s: len(domain.prompt_set(s)) for s in facts["prompt_sets"]} == facts[
            "prompt_sets"]
        assert facts["default_prompt_set"] in (None, *facts["prompt_sets"])
    assert info["shapes"]["prompt_sets"] == {"shapes-color": 24, "shapes-full": 72,
                                             "shapes-shape": 4}
    assert info["generic"] == GENERIC_OFFER  # the API's fallback before any worker published
    registry = Registry(tmp_path)
    registry.publish_domains({"shapes": info["shapes"]})
    registry.publish_domains({"generic": info["generic"]})  # a second worker adds, keeps
    assert registry.domains() == {"generic": info["generic"], "shapes": info["shapes"]}
    assert registry.models() == []  # the file is no model


def test_an_sdxl_model_is_evaluated_through_the_generic_domain(clip_folder):  # noqa: F811
    """SDXL draws and is measured like any model of the generic domain (CLIP score)."""
    from app.config import Settings
    from app.jobspecs import EvaluateJob
    from worker.evaluation import evaluate
    from worker.tiny import tiny_sdxl_pipeline

    spec = EvaluateJob(model="tiny-sdxl", prompts=["a red circle", "a blue square"],
                       images_per_prompt=2, seed=0, metrics=["clip_score"],
                       guidance_scale=5.0, steps=2, height=32, width=32)
    report = evaluate(tiny_sdxl_pipeline(seed=0), spec,
                      settings=Settings(clip_model_path=clip_folder))
    assert report["images"] == 4
    assert isinstance(report["metrics"]["clip_score"], float)
