"""A small Python client of Lethe's HTTP API (httpx), used by the CLI, ``bench/`` and the
tests: one place that knows the routes, the error shape and how to wait for a job.

    with LetheClient("http://127.0.0.1:8000", api_key="...") as lethe:
        job = lethe.wait(lethe.generate(prompt="a red circle", num_images=2))
        png = lethe.image(job["id"], 0)

``wait`` long-polls (``GET /jobs/{id}?wait=``): one request per 30 s of waiting, answered
the moment the job finishes. Errors the service answers come back as ``ApiError`` with its
status, code and message.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

import httpx

FINISHED = ("succeeded", "failed", "canceled")
LONG_POLL_S = 30.0  # the most GET /jobs/{id}?wait= holds a request
POLL_S = 0.05  # between reads when waiting for a state long polls do not wait for


class ApiError(Exception):
    """An error answer: its HTTP status and the service's ``error.code`` and message."""

    def __init__(self, status: int, code: str, message: str, details: Any = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details


class JobWaitTimeout(TimeoutError):
    """The job had not reached the state waited for in time; ``job`` is its last view."""

    def __init__(self, job: dict):
        super().__init__(f"job {job['id']} still {job['status']}")
        self.job = job


class LetheClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout_s: float = 30.0, http: httpx.Client | None = None):
        """``http``: an httpx client to use as it is (its base URL and headers), for one
        the caller owns; otherwise one is made from ``base_url`` and ``api_key``."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owned = http is None
        self.http = http or httpx.Client(base_url=base_url, headers=headers,
                                         timeout=timeout_s)

    def __enter__(self) -> LetheClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        r = self.http.request(method, path, **kwargs)
        if r.status_code >= 400:
            self._raise(r)
        return r

    @staticmethod
    def _raise(r: httpx.Response) -> None:
        try:
            error = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            error = {"code": "http_error", "message": r.text[:300]}
        raise ApiError(r.status_code, error.get("code", "http_error"),
                       error.get("message", ""), error.get("details"))

    # Submitting: each returns the new job's id. ``idempotency_key``: a retry with the same
    # key and body gets the first request's job back, never a second job.
    def submit(self, path: str, body: dict[str, Any], idempotency_key: str | None = None
               ) -> str:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", path, json=_drop_none(body), headers=headers).json()["id"]

    def generate(self, idempotency_key: str | None = None, **body: Any) -> str:
        return self.submit("/generate", body, idempotency_key)

    def erase(self, idempotency_key: str | None = None, **body: Any) -> str:
        return self.submit("/erase", body, idempotency_key)

    def evaluate(self, idempotency_key: str | None = None, **body: Any) -> str:
        return self.submit("/evaluate", body, idempotency_key)

    def upscale(self, image: bytes | None = None, source: dict[str, Any] | None = None,
                **options: Any) -> str:
        """×4 of ``image`` (PNG, JPEG, WebP or BMP bytes, sent as multipart) or of an earlier
        job's output image (``source={"job_id": ..., "index": 0}``)."""
        if image is not None:
            fields = {k: str(v) for k, v in _drop_none(options).items()}
            return self._call("POST", "/upscale", data=fields,
                              files={"image": ("image", image)}).json()["id"]
        return self.submit("/upscale", {"source": source, **options})

    # Jobs.
    def jobs(self, status: str | None = None, type: str | None = None, limit: int = 100,
             owner: str | None = None) -> Iterator[dict[str, Any]]:
        """The caller's jobs (an admin's: everyone's, or ``owner``'s), newest first,
        following ``GET /jobs``'s pages."""
        cursor = None
        while True:
            page = self._call("GET", "/jobs", params=_drop_none({
                "status": status, "type": type, "limit": limit, "owner": owner,
                "cursor": cursor})).json()
            yield from page["data"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def purge(self, job_id: str) -> None:
        """Remove a finished job's images and record now."""
        self._call("DELETE", f"/jobs/{job_id}", params={"purge": "true"})

    def job(self, job_id: str, wait_s: float = 0) -> dict[str, Any]:
        params = {"wait": round(wait_s, 3)} if wait_s > 0 else None
        timeout = wait_s + self.http.timeout.read if self.http.timeout.read else None
        return self._call("GET", f"/jobs/{job_id}", params=params, timeout=timeout).json()

    def wait(self, job_id: str, timeout_s: float | None = None,
             until: Iterable[str] = FINISHED,
             on_progress: Callable[[dict[str, Any]], None] | None = None,
             every_s: float = LONG_POLL_S) -> dict[str, Any]:
        """The job once its status is one of ``until`` or it has finished, whichever comes
        first. Raises ``JobWaitTimeout`` after ``timeout_s``. ``on_progress(job)`` sees
        each view read, at least every ``every_s`` while the job runs."""
        wanted = set(until)
        long_poll = wanted <= set(FINISHED)  # ?wait= answers early only when finished
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = LONG_POLL_S if deadline is None else deadline - time.monotonic()
            job = self.job(job_id, wait_s=max(0.0, min(left, every_s, LONG_POLL_S))
                           if long_poll else 0)
            if on_progress:
                on_progress(job)
            if job["status"] in wanted or job["status"] in FINISHED:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise JobWaitTimeout(job)
            if not long_poll:
                time.sleep(POLL_S)

    def events(self, job_id: str, last_event_id: str | None = None
               ) -> Iterator[dict[str, Any]]:
        """The job's events (``GET /jobs/{id}/events``) as they come: dicts with ``event``
        (progress, preview, succeeded, failed, canceled), ``id`` and ``data``; the stream
        ends after the final event. ``last_event_id`` resumes after that event."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        timeout = httpx.Timeout(self.http.timeout.connect, read=None)  # pings keep it alive
        with self.http.stream("GET", f"/jobs/{job_id}/events", headers=headers,
                              timeout=timeout) as r:
            if r.status_code >= 400:
                r.read()
                self._raise(r)
            event: dict[str, Any] = {}
            for line in r.iter_lines():
                if not line:  # a blank line ends an event
                    if "data" in event:
                        event["data"] = json.loads(event["data"])
                        event.setdefault("event", "message")
                        yield event
                    event = {}
                elif not line.startswith(":"):  # ":" lines are comments (pings)
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "data" and "data" in event:
                        event["data"] += "\n" + value
                    elif name in ("event", "id", "data"):
                        event[name] = value

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/jobs/{job_id}").json()

    def image(self, job_id: str, index: int = 0) -> bytes:
        return self._call("GET", f"/jobs/{job_id}/images/{index}").content

    # Models and the service.
    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/models").json()["data"]

    def model(self, model_id: str) -> dict[str, Any]:
        return self._call("GET", f"/models/{model_id}").json()

    def delete_model(self, model_id: str) -> None:
        self._call("DELETE", f"/models/{model_id}")

    def ready(self) -> dict[str, Any]:
        return self._call("GET", "/readyz").json()


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    """A request without the fields left unset: the service fills their defaults."""
    return {k: v for k, v in body.items() if v is not None}
