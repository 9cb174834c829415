"""An erase's evidence on tiny models: the grid's layout, the drift, and CLIP's verdicts."""

from __future__ import annotations

import pytest

from tests.worker.test_features import clip_folder  # noqa: F401  (a fixture)
from worker.domains import get_domain
from worker.evidence import COLUMNS, evidence
from worker.features import ClipScorer
from worker.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def pipes():
    base, edited = tiny_pipeline(seed=0), tiny_pipeline(seed=1)  # an "edit" that moved all
    for p in (base, edited):
        p.set_progress_bar_config(disable=True)
    return base, edited


def test_the_grid_is_rows_by_columns_and_the_report_names_what_is_missing(pipes):
    grid, report = evidence(*pipes, get_domain("generic"), ["red"], guidance=5.0, steps=2,
                            size=(32, 32))
    rows = [(r["kind"], r["prompt"]) for r in report["rows"]]
    assert rows == [("erased", "a photo of a red"), ("erased", "a red"),
                    ("neighbour", "a photo of a dog"), ("neighbour", "a photo of a cat")]
    assert grid.size == (len(COLUMNS) * 128, len(rows) * 128)
    assert report["drift"]["psnr"] < 40 and report["drift"]["ssim"] < 0.99  # other weights
    assert report["clip"] is None and "LETHE_CLIP_MODEL_PATH" in report["clip_note"]


def test_clip_scores_how_often_the_prompt_beats_its_anchor(pipes, clip_folder):  # noqa: F811
    clip = ClipScorer(clip_folder, pipes[0].device)
    _, report = evidence(*pipes, get_domain("generic"), ["red"], guidance=5.0, steps=2,
                         size=(32, 32), clip=clip)
    for kind in ("erased", "neighbour"):
        scores = report["clip"][kind]
        assert scores["images"] == 2 * 4  # two rows, four seeds each
        assert 0.0 <= scores["before"] <= 1.0 and 0.0 <= scores["after"] <= 1.0
    # The same model on both sides: CLIP's verdicts cannot move.
    _, same = evidence(pipes[0], pipes[0], get_domain("generic"), ["red"], guidance=5.0,
                       steps=2, size=(32, 32), clip=clip)
    assert same["clip"]["erased"]["before"] == same["clip"]["erased"]["after"]
    assert same["drift"]["identical"] is True and same["drift"]["psnr"] is None
