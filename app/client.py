"""Lethe's Python SDK: ``LetheClient`` (sync) and ``AsyncLetheClient`` (asyncio), over httpx.

The one place that knows the routes, the error shape and how to wait for a job; the CLI,
``bench/`` and the tests use it. Results are the API's own pydantic models
(``app.schemas``: ``JobCreated``, ``JobPublic``, ``ModelPublic``...); errors are
``ApiError`` with the service's status, ``code`` and message. It needs httpx and pydantic
only (``app`` never imports torch).

    from app.client import LetheClient

    with LetheClient("http://127.0.0.1:8000", api_key="...") as lethe:
        job = lethe.wait(lethe.generate(prompt="a red circle", num_images=2))
        png = lethe.image(job, 0)

``wait`` long-polls (``GET /jobs/{id}?wait=``): one request per 30 s of waiting, answered
the moment the job finishes; ``events`` follows a job's Server-Sent Events as they come.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from pydantic import BaseModel

from app.schemas import (
    FINISHED,
    Health,
    JobCreated,
    JobPublic,
    JobsPage,
    ModelPublic,
    ModelsPublic,
)

LONG_POLL_S = 30.0  # the most GET /jobs/{id}?wait= holds a request
POLL_S = 0.05  # between reads when waiting for a state long polls do not wait for

JobRef = str | JobCreated | JobPublic  # a job, by id or as the service described it


class ApiError(Exception):
    """An error answer: its HTTP status and the service's ``error.code`` and message."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 retry_after_s: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details
        self.retry_after_s = retry_after_s  # a 429 or 503 says when to try again


class JobWaitTimeout(TimeoutError):
    """The job had not reached the state waited for in time; ``job`` is its last view."""

    def __init__(self, job: JobPublic):
        super().__init__(f"job {job.id} still {job.status}")
        self.job = job


class JobEvent(BaseModel):
    """One Server-Sent Event of a job: ``started``, ``progress``, ``preview``, then one of
    ``succeeded``, ``failed``, ``canceled`` whose data is the finished job."""

    event: str
    id: str | None = None
    data: dict[str, Any]

    @property
    def job(self) -> JobPublic | None:
        return JobPublic.model_validate(self.data) if self.event in FINISHED else None


def _id(job: JobRef) -> str:
    return job if isinstance(job, str) else job.id


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    """A request without the fields left unset: the service fills their defaults."""
    return {k: v for k, v in body.items() if v is not None}


def _raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        error = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {"code": "http_error", "message": r.text[:300]}
    retry = r.headers.get("retry-after")
    raise ApiError(r.status_code, error.get("code", "http_error"), error.get("message", ""),
                   error.get("details"), float(retry) if retry and retry.isdigit() else None)


def _backoff_s(attempt: int) -> float:
    return 0.5 * 2 ** attempt


def _key_header(key: str | None) -> dict[str, str]:
    """Every submission carries an ``Idempotency-Key`` (the caller's, or a new one), so a
    retry after a lost connection never queues a second job."""
    return {"Idempotency-Key": key or str(uuid.uuid4())}


# What each call sends: (method, path, httpx keyword arguments), shared by both clients.
def _submit(path: str, body: dict[str, Any], key: str | None) -> tuple[str, str, dict]:
    return "POST", path, {"json": _drop_none(body), "headers": _key_header(key)}


def _upscale(image: bytes | None, source: dict | None, options: dict[str, Any],
             key: str | None) -> tuple[str, str, dict]:
    if image is None:
        return _submit("/upscale", {"source": source, **options}, key)
    fields = {k: str(v) for k, v in _drop_none(options).items()}
    return "POST", "/upscale", {"data": fields, "files": {"image": ("image", image)},
                                "headers": _key_header(key)}


def _jobs_page(status: str | None, type: str | None, limit: int, owner: str | None,
               cursor: str | None) -> dict[str, Any]:
    return _drop_none({"status": status, "type": type, "limit": limit, "owner": owner,
                       "cursor": cursor})


class _Waiting:
    """The decisions of ``wait``, the same for both clients: how long each read may hold,
    and when to stop."""

    def __init__(self, timeout_s: float | None, until: Iterable[str], every_s: float):
        self.wanted = set(until)
        self.long_poll = self.wanted <= set(FINISHED)  # ?wait= answers early only at the end
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.every_s = every_s

    def hold_s(self) -> float:
        if not self.long_poll:
            return 0.0
        left = LONG_POLL_S if self.deadline is None else self.deadline - time.monotonic()
        return max(0.0, min(left, self.every_s, LONG_POLL_S))

    def done(self, job: JobPublic) -> bool:
        if job.status in self.wanted or job.status in FINISHED:
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise JobWaitTimeout(job)
        return False


class _Events:
    """Server-Sent Events from lines: ``feed`` each line, get a ``JobEvent`` at each end."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}

    def feed(self, line: str) -> JobEvent | None:
        if not line:  # a blank line ends an event
            fields, self.fields = self.fields, {}
            if "data" not in fields:
                return None
            return JobEvent(event=fields.get("event", "message"), id=fields.get("id"),
                            data=json.loads(fields["data"]))
        if not line.startswith(":"):  # ":" lines are comments (pings)
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data" and "data" in self.fields:
                self.fields["data"] += "\n" + value
            elif name in ("event", "id", "data"):
                self.fields[name] = value
        return None


def _stream_timeout(http: httpx.Client | httpx.AsyncClient) -> httpx.Timeout:
    return httpx.Timeout(http.timeout.connect, read=None)  # pings keep the stream alive


def _hold_timeout(http: httpx.Client | httpx.AsyncClient, wait_s: float) -> float | None:
    return wait_s + http.timeout.read if http.timeout.read else None


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class LetheClient:
    """The service from blocking code."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout_s: float = 30.0, http: httpx.Client | None = None,
                 max_retries: int = 2):
        """``http``: an httpx client to use as it is (its base URL and headers), for one
        the caller owns; otherwise one is made from ``base_url`` and ``api_key``.
        ``max_retries``: times a submission that lost its connection is sent again (with
        the same ``Idempotency-Key``: the service queues it once)."""
        self.max_retries = max_retries
        self._owned = http is None
        self.http = http or httpx.Client(base_url=base_url, headers=_headers(api_key),
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
        _raise_for(r)
        return r

    def _created(self, request: tuple[str, str, dict[str, Any]]) -> JobCreated:
        """A submission, sent again after a lost connection (its key makes that safe)."""
        method, path, kwargs = request
        for attempt in range(self.max_retries + 1):
            try:
                return JobCreated.model_validate(self._call(method, path, **kwargs).json())
            except httpx.TransportError:
                if attempt == self.max_retries:
                    raise
                time.sleep(_backoff_s(attempt))
        raise AssertionError("unreachable")

    # Submitting: each returns the new job. ``idempotency_key``: a retry with the same key
    # and body gets the first request's job back, never a second job.
    def submit(self, path: str, body: dict[str, Any], idempotency_key: str | None = None
               ) -> JobCreated:
        return self._created(_submit(path, body, idempotency_key))

    def generate(self, idempotency_key: str | None = None, **body: Any) -> JobCreated:
        return self.submit("/generate", body, idempotency_key)

    def erase(self, idempotency_key: str | None = None, **body: Any) -> JobCreated:
        return self.submit("/erase", body, idempotency_key)

    def evaluate(self, idempotency_key: str | None = None, **body: Any) -> JobCreated:
        return self.submit("/evaluate", body, idempotency_key)

    def upscale(self, image: bytes | None = None, source: dict[str, Any] | None = None,
                idempotency_key: str | None = None, **options: Any) -> JobCreated:
        """×4 of ``image`` (PNG, JPEG, WebP or BMP bytes, sent as multipart) or of an earlier
        job's output image (``source={"job_id": ..., "index": 0}``)."""
        return self._created(_upscale(image, source, options, idempotency_key))

    # Jobs.
    def job(self, job: JobRef, wait_s: float = 0) -> JobPublic:
        params = {"wait": round(wait_s, 3)} if wait_s > 0 else None
        return JobPublic.model_validate(self._call(
            "GET", f"/jobs/{_id(job)}", params=params,
            timeout=_hold_timeout(self.http, wait_s)).json())

    def wait(self, job: JobRef, timeout_s: float | None = None,
             until: Iterable[str] = FINISHED,
             on_progress: Callable[[JobPublic], None] | None = None,
             every_s: float = LONG_POLL_S) -> JobPublic:
        """The job once its status is one of ``until`` or it has finished, whichever comes
        first. Raises ``JobWaitTimeout`` after ``timeout_s``. ``on_progress(job)`` sees
        each view read, at least every ``every_s`` while the job runs."""
        waiting = _Waiting(timeout_s, until, every_s)
        while True:
            view = self.job(job, wait_s=waiting.hold_s())
            if on_progress:
                on_progress(view)
            if waiting.done(view):
                return view
            if not waiting.long_poll:
                time.sleep(POLL_S)

    def events(self, job: JobRef, last_event_id: str | None = None) -> Iterator[JobEvent]:
        """The job's events (``GET /jobs/{id}/events``) as they come; the iteration ends
        after the final event. ``last_event_id`` resumes after that event."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        with self.http.stream("GET", f"/jobs/{_id(job)}/events", headers=headers,
                              timeout=_stream_timeout(self.http)) as r:
            if r.status_code >= 400:
                r.read()
                _raise_for(r)
            parser = _Events()
            for line in r.iter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event

    def jobs(self, status: str | None = None, type: str | None = None, limit: int = 100,
             owner: str | None = None) -> Iterator[JobPublic]:
        """The caller's jobs (an admin's: everyone's, or ``owner``'s), newest first,
        following ``GET /jobs``'s pages."""
        cursor = None
        while True:
            page = JobsPage.model_validate(self._call("GET", "/jobs", params=_jobs_page(
                status, type, limit, owner, cursor)).json())
            yield from page.data
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, job: JobRef) -> JobPublic:
        return JobPublic.model_validate(self._call("DELETE", f"/jobs/{_id(job)}").json())

    def purge(self, job: JobRef) -> None:
        """Remove a finished job's images and record now."""
        self._call("DELETE", f"/jobs/{_id(job)}", params={"purge": "true"})

    def image(self, job: JobRef, index: int = 0) -> bytes:
        return self._call("GET", f"/jobs/{_id(job)}/images/{index}").content

    # Models and the service.
    def models(self) -> list[ModelPublic]:
        return ModelsPublic.model_validate(self._call("GET", "/models").json()).data

    def model(self, model_id: str) -> ModelPublic:
        return ModelPublic.model_validate(self._call("GET", f"/models/{model_id}").json())

    def delete_model(self, model_id: str) -> None:
        self._call("DELETE", f"/models/{model_id}")

    def webhook_secret(self) -> str:
        """A new secret for this key's webhook deliveries (``whsec_...``), replacing any
        before it: the service shows it this once."""
        return str(self._call("POST", "/webhooks/secret").json()["secret"])

    def set_visibility(self, model_id: str, visibility: str) -> ModelPublic:
        """Make a model this key made ``private`` (its owner and admins see it) or
        ``public`` (every key)."""
        return ModelPublic.model_validate(self._call(
            "PATCH", f"/models/{model_id}", json={"visibility": visibility}).json())

    def upload_model(self, path: str | Path, model_id: str,
                     prediction_type: str | None = None, base: str | None = None,
                     visibility: str | None = None) -> JobCreated:
        """Upload a single-file checkpoint as ``model_id`` (or a LoRA file as an edit of
        model ``base``); poll the job it returns. ``visibility``: ``private`` or
        ``public`` (default: private on a service with keys)."""
        fields = _drop_none({"id": model_id, "prediction_type": prediction_type,
                             "base": base, "visibility": visibility})
        with open(path, "rb") as f:
            return JobCreated.model_validate(self._call(
                "POST", "/models", data=fields,
                files={"file": (Path(path).name, f)}).json())

    def download_model(self, model_id: str, dest: str | Path, format: str = "single-file",
                       timeout_s: float | None = None, **query: Any) -> Path:
        """The model as ``format`` (diffusers zip, single-file, lora) written to ``dest``;
        the first request makes the export (a job, waited for here). ``query``: the
        route's other parameters (``dtype``, ``rank``, ``lora_layout``)."""
        params = _drop_none({"format": format, **query})
        while True:
            with self.http.stream("GET", f"/models/{model_id}/download", params=params,
                                  timeout=_stream_timeout(self.http)) as r:
                if r.status_code == 202:
                    r.read()
                    made = self.wait(r.json()["id"], timeout_s=timeout_s)
                    if made.status != "succeeded":
                        raise ApiError(500, "export_failed", f"the export {made.status}: "
                                       f"{made.error}")
                    continue
                if r.status_code >= 400:
                    r.read()
                    _raise_for(r)
                with open(dest, "wb") as out:
                    for chunk in r.iter_bytes():
                        out.write(chunk)
                return Path(dest)

    def ready(self) -> Health:
        r = self.http.get("/readyz")  # 503 carries the same body: not an error here
        return Health.model_validate(r.json())


class AsyncLetheClient:
    """The service from asyncio code: the same calls as ``LetheClient``, awaited."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout_s: float = 30.0, http: httpx.AsyncClient | None = None,
                 max_retries: int = 2):
        self.max_retries = max_retries
        self._owned = http is None
        self.http = http or httpx.AsyncClient(base_url=base_url, headers=_headers(api_key),
                                              timeout=timeout_s)

    async def __aenter__(self) -> AsyncLetheClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owned:
            await self.http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        r = await self.http.request(method, path, **kwargs)
        _raise_for(r)
        return r

    async def _created(self, request: tuple[str, str, dict[str, Any]]) -> JobCreated:
        method, path, kwargs = request
        for attempt in range(self.max_retries + 1):
            try:
                return JobCreated.model_validate((await self._call(method, path, **kwargs)
                                                  ).json())
            except httpx.TransportError:
                if attempt == self.max_retries:
                    raise
                await asyncio.sleep(_backoff_s(attempt))
        raise AssertionError("unreachable")

    async def submit(self, path: str, body: dict[str, Any],
                     idempotency_key: str | None = None) -> JobCreated:
        return await self._created(_submit(path, body, idempotency_key))

    async def generate(self, idempotency_key: str | None = None, **body: Any) -> JobCreated:
        return await self.submit("/generate", body, idempotency_key)

    async def erase(self, idempotency_key: str | None = None, **body: Any) -> JobCreated:
        return await self.submit("/erase", body, idempotency_key)

    async def evaluate(self, idempotency_key: str | None = None, **body: Any) -> JobCreated:
        return await self.submit("/evaluate", body, idempotency_key)

    async def upscale(self, image: bytes | None = None, source: dict[str, Any] | None = None,
                      idempotency_key: str | None = None, **options: Any) -> JobCreated:
        return await self._created(_upscale(image, source, options, idempotency_key))

    async def job(self, job: JobRef, wait_s: float = 0) -> JobPublic:
        params = {"wait": round(wait_s, 3)} if wait_s > 0 else None
        return JobPublic.model_validate((await self._call(
            "GET", f"/jobs/{_id(job)}", params=params,
            timeout=_hold_timeout(self.http, wait_s))).json())

    async def wait(self, job: JobRef, timeout_s: float | None = None,
                   until: Iterable[str] = FINISHED,
                   on_progress: Callable[[JobPublic], None] | None = None,
                   every_s: float = LONG_POLL_S) -> JobPublic:
        waiting = _Waiting(timeout_s, until, every_s)
        while True:
            view = await self.job(job, wait_s=waiting.hold_s())
            if on_progress:
                on_progress(view)
            if waiting.done(view):
                return view
            if not waiting.long_poll:
                await asyncio.sleep(POLL_S)

    async def events(self, job: JobRef, last_event_id: str | None = None
                     ) -> AsyncIterator[JobEvent]:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        async with self.http.stream("GET", f"/jobs/{_id(job)}/events", headers=headers,
                                    timeout=_stream_timeout(self.http)) as r:
            if r.status_code >= 400:
                await r.aread()
                _raise_for(r)
            parser = _Events()
            async for line in r.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event

    async def jobs(self, status: str | None = None, type: str | None = None,
                   limit: int = 100, owner: str | None = None) -> AsyncIterator[JobPublic]:
        cursor = None
        while True:
            page = JobsPage.model_validate((await self._call(
                "GET", "/jobs", params=_jobs_page(status, type, limit, owner, cursor))).json())
            for job in page.data:
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, job: JobRef) -> JobPublic:
        return JobPublic.model_validate((await self._call("DELETE", f"/jobs/{_id(job)}")
                                         ).json())

    async def purge(self, job: JobRef) -> None:
        await self._call("DELETE", f"/jobs/{_id(job)}", params={"purge": "true"})

    async def image(self, job: JobRef, index: int = 0) -> bytes:
        return (await self._call("GET", f"/jobs/{_id(job)}/images/{index}")).content

    async def models(self) -> list[ModelPublic]:
        return ModelsPublic.model_validate((await self._call("GET", "/models")).json()).data

    async def model(self, model_id: str) -> ModelPublic:
        return ModelPublic.model_validate((await self._call("GET", f"/models/{model_id}")
                                           ).json())

    async def delete_model(self, model_id: str) -> None:
        await self._call("DELETE", f"/models/{model_id}")

    async def ready(self) -> Health:
        return Health.model_validate((await self.http.get("/readyz")).json())
