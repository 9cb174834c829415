"""Logs as JSON lines, each line of a job carrying its id."""

from __future__ import annotations

import json
import logging

from app import logs
from tests.support import wait_job


def test_a_jobs_lines_carry_its_id_and_others_do_not(capsys):
    logs.configure("json")
    log = logging.getLogger("lethe.test")
    token = logs.current_job.set("job-123")
    try:
        log.info("step %d of %d", 1, 2, extra={"stage": "training"})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        logs.current_job.reset(token)
    log.warning("idle")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0] == {**lines[0], "level": "info", "logger": "lethe.test",
                        "message": "step 1 of 2", "job_id": "job-123", "stage": "training"}
    assert lines[1]["job_id"] == "job-123" and "ValueError: boom" in lines[1]["exception"]
    assert "job_id" not in lines[2] and lines[2]["level"] == "warning"


def test_every_worker_line_of_a_job_is_json_with_its_id(http, home):
    r = http.post("/generate", json={"prompt": "a", "steps": 1, "width": 64, "height": 64})
    job_id = r.json()["id"]
    assert wait_job(http, job_id)["status"] == "succeeded"
    text = (home / "worker-main.log").read_text()
    mentions = [line for line in text.splitlines() if job_id in line]
    assert len(mentions) >= 2, text[-2000:]  # RQ's start and end lines at least
    for line in mentions:
        record = json.loads(line)
        assert record["job_id"] == job_id, record
    print(f"{len(mentions)} lines of job {job_id}, e.g. {mentions[0]}")
