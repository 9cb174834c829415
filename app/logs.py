"""Logs as JSON lines (or plain text), each line of a job carrying its ``job_id``.

The worker sets the running job's id in a context variable for the length of the job; a
filter puts it on every record logged meanwhile, RQ's own lines and library warnings
included, so ``grep <job-id>`` (or a log store's query) finds the whole of one job.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import datetime, timezone

current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("lethe_job_id",
                                                                        default=None)
# uvicorn adds `color_message`: the same text with terminal colours.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "job_id", "color_message"}


class _JobId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "job_id", None):  # a logger's own filter may have set it
            record.job_id = current_job.get()  # type: ignore[attr-defined]
        return True


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the job id where there is
    one, anything passed in ``extra``, and the traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        job = getattr(record, "job_id", None)
        if job:
            line["job_id"] = job
        line |= {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job = getattr(record, "job_id", None)
        return f"{text} [job {job}]" if job else text


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture replaces it)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


def configure(fmt: str = "json", level: int = logging.INFO) -> None:
    """Send every logger's records to stderr in ``fmt`` (json or text), replacing the
    handlers others set (RQ installs its own on the worker's logger)."""
    handler = _Stderr()
    handler.addFilter(_JobId())
    handler.setFormatter(JsonLines() if fmt == "json" else
                         _Text("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("rq.worker", "rq.job", "rq.queue", "rq"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
