"""GET /jobs/{id}/events over real HTTP: progress, previews, the final event, resuming."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from app import events
from app.client import ApiError, LetheClient

pytestmark = pytest.mark.slow


@pytest.fixture
def lethe(http):
    return LetheClient(http=http)


def png_of(data_url: str) -> Image.Image:
    head, _, body = data_url.partition(",")
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(body)))


def test_progress_previews_then_the_finished_job(lethe):
    job_id = lethe.generate(prompt="a red circle", model="tiny-sd", steps=20, previews=5,
                            seed=3, width=32, height=32).id
    seen = list(lethe.events(job_id))
    names = [e.event for e in seen]
    assert names[-1] == "succeeded" and names.count("succeeded") == 1
    final = seen[-1].data
    assert final["id"] == job_id and final["status"] == "succeeded" and final["result"]
    assert seen[-1].job.status == "succeeded"  # the final event as the typed job
    assert "progress" in names
    previews = [e.data for e in seen if e.event == "preview"]
    assert [p["step"] for p in previews] == [5, 10, 15]  # every 5 steps; step 20 is the image
    assert all(png_of(p["image"]).size == (32, 32) for p in previews)
    ids = [e.id for e in seen]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    # Previews only watch: the same seed without them draws the very same image.
    plain = lethe.wait(lethe.generate(prompt="a red circle", model="tiny-sd", steps=20,
                                      seed=3, width=32, height=32))
    assert lethe.image(plain) == lethe.image(job_id)


def test_a_client_that_reconnects_with_last_event_id_misses_nothing(lethe):
    job_id = lethe.generate(prompt="a blue square", model="tiny-sd", steps=60, previews=10,
                            width=32, height=32).id
    first = []
    for event in lethe.events(job_id):
        first.append(event)
        if len(first) == 3:
            break  # the connection drops mid-job
    rest = list(lethe.events(job_id, last_event_id=first[-1].id))
    assert rest[-1].event == "succeeded"
    # A late client gets the whole history, but for the older previews: the stream keeps
    # the newest few (their pictures are what a job's events weigh in Redis).
    everything = list(lethe.events(job_id))
    live = first + rest
    late = {e.id for e in everything}
    assert [e.id for e in live if e.id in late] == [e.id for e in everything]
    gone = [e for e in live if e.id not in late]
    assert {e.event for e in gone} == {"preview"}
    assert sum(e.event == "preview" for e in everything) == events.PREVIEWS_KEPT


def test_a_canceled_job_ends_its_stream_with_canceled(lethe):
    job_id = lethe.generate(prompt="a red circle", model="tiny-sd", steps=400,
                            width=32, height=32)
    for event in lethe.events(job_id):
        if event.event == "progress" and event.data["stage"] == "denoising":
            lethe.cancel(job_id)
        if event.event in ("succeeded", "failed", "canceled"):
            break
    assert event.event == "canceled" and event.data["status"] == "canceled"


def test_unknown_jobs_and_bad_event_ids_are_refused(lethe):
    with pytest.raises(ApiError) as missing:
        list(lethe.events("no-such-job"))
    assert missing.value.status == 404
    job_id = lethe.generate(prompt="a red circle", model="tiny-sd", steps=2)
    with pytest.raises(ApiError) as bad:
        list(lethe.events(job_id, last_event_id="yesterday"))
    assert bad.value.status == 422 and "Last-Event-ID" in bad.value.message


def test_cli_commands_draw_their_progress_from_the_events(live_url, worker, capsys, tmp_path):
    from pathlib import Path

    from app.cli import main

    main(["generate", "a red circle", "--url", live_url, "--model", "tiny-sd", "--steps", "5",
          "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    png = Path(out.strip())
    assert Image.open(png).size == (32, 32)
    assert "denoising" in err and "5/5" in err  # the bar, at its end
    main(["upscale", str(png), "--url", live_url, "--steps", "2", "--out", str(tmp_path / "x4")])
    out, err = capsys.readouterr()
    assert Image.open(out.strip()).size == (128, 128)
    assert "upscaling" in err
