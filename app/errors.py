"""Every error a client can see: one class a line, each with its HTTP status and code.

Free of the web framework: the worker and the pure-maths modules (``worker.esd``,
``worker.metrics``) raise these too. ``app.api.handlers`` maps them to HTTP answers.
"""

from __future__ import annotations

from typing import Any


class LetheError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.message, self.details = message, details


class InvalidParams(LetheError):
    status, code = 422, "invalid_params"


class ModelNotFound(LetheError):
    status, code = 404, "model_not_found"


class JobNotFound(LetheError):
    status, code = 404, "job_not_found"


class ImageNotFound(LetheError):
    status, code = 404, "image_not_found"


class JobNotFinished(LetheError):
    status, code = 409, "job_not_finished"


class ModelExists(LetheError):
    status, code = 409, "model_exists"


class ModelProtected(LetheError):
    status, code = 409, "model_protected"


class Forbidden(LetheError):
    status, code = 403, "forbidden"


class IdempotencyConflict(LetheError):
    status, code = 409, "idempotency_conflict"


class RateLimited(LetheError):  # details: {"retry_after_s": n}, sent as Retry-After
    status, code = 429, "rate_limited"


class UnsupportedMedia(LetheError):
    status, code = 415, "unsupported_media_type"


class Unauthorized(LetheError):
    status, code = 401, "unauthorized"


class TooLarge(LetheError):
    status, code = 413, "too_large"


class JobEndedBadly(LetheError):  # POST /v1/images/generations: its job failed or was canceled
    status, code = 500, "job_failed"


class JobUnfinished(LetheError):  # ... its job outlasted the wait (the job goes on)
    status, code = 504, "job_still_running"


class Unavailable(LetheError):
    status, code = 503, "unavailable"


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message names what it got, but never
    echoes a 100 kB id back whole."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
