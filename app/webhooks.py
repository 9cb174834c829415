"""Webhooks: a job's events POSTed to a URL its submitter gave, signed, retried for an hour.

Deliveries follow the Standard Webhooks scheme (standardwebhooks.com): headers
``webhook-id``, ``webhook-timestamp`` and ``webhook-signature: v1,<base64>``, the signature
an HMAC-SHA256 with ``LETHE_WEBHOOK_SECRET`` over ``"<id>.<timestamp>.<body>"`` (a secret
written ``whsec_<base64>`` is used base64-decoded, as the scheme's libraries do).

Whoever appends a job event (``app.events.publish``) also queues its delivery here when the
job asked for that kind of event: an entry in a Redis stream read by a consumer group, so
one API process delivers each entry even with several running, and an entry whose
process died is taken over. A failed attempt is scheduled again (a sorted set by due time)
with exponential back-off, ``RETRY_DELAYS_S`` long in all: more than an hour. Each job's
delivery record (attempts, last status) is a hash beside it, shown on ``GET /jobs/{id}``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from app import metrics
from app.errors import InvalidParams, shown
from app.events import text

log = logging.getLogger("lethe.webhooks")

OUTBOX = "lethe:webhooks"
GROUP = "deliverers"
DUE = "lethe:webhooks:due"  # retries, scored by the time they are due
RECORD = "lethe:webhook:"  # + job id: the job's delivery record
EVENTS = ("started", "progress", "completed")
# Seconds before each retry (× the base): 13 attempts over 64 minutes.
RETRY_DELAYS_S = (5, 10, 20, 40, 80, 160, 320, 600, 600, 600, 600, 600)
TIMEOUT_S = 10.0


def check_target(url: str, allow: set[str]) -> str:
    """``url`` if deliveries may go there: http(s), and not to a loopback, private,
    link-local or otherwise internal address unless its host is in ``allow``
    (``LETHE_WEBHOOK_ALLOW``): a service must not be turned into a probe of its own network."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidParams(f"`webhook` must be an http(s) URL, got {shown(url)}")
    host = parts.hostname
    if host in allow:
        return url
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, parts.port or 443)}
    except (socket.gaierror, UnicodeError):
        raise InvalidParams(f"`webhook` host {host!r} does not resolve") from None
    for address in addresses:
        ip = ipaddress.ip_address(str(address).split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise InvalidParams(
                f"`webhook` {shown(url)} points at {ip} (loopback, private or link-local); "
                "such targets need the operator's LETHE_WEBHOOK_ALLOW")
    return url


def of_request(body: Any, settings: Any) -> dict[str, Any] | None:
    """The ``webhook`` a job-creating body asks for, checked; None when it asks for none."""
    if getattr(body, "webhook", None) is None:
        return None
    if not settings.webhook_secret:
        raise InvalidParams("`webhook` needs the service to sign deliveries: the operator "
                            "has not set LETHE_WEBHOOK_SECRET")
    allow = {h.strip() for h in settings.webhook_allow.split(",") if h.strip()}
    return {"url": check_target(body.webhook, allow),
            "events": sorted(set(body.webhook_events))}


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = (base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_")
           else secret.encode())
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def kind_of(event: str) -> str | None:
    """Which subscribable kind a job event is."""
    if event in ("succeeded", "failed", "canceled"):
        return "completed"
    return event if event in ("started", "progress") else None


def queue_delivery(connection: Redis, job_meta: dict[str, Any], job_id: str, event: str,
                   data: dict[str, Any]) -> None:
    """Queue the delivery of ``event`` if the job asked for its kind."""
    hook = job_meta.get("webhook")
    kind = kind_of(event)
    if not hook or kind not in hook.get("events", ()):
        return
    body = json.dumps({"type": f"job.{event}", "job_id": job_id, "data": data})
    connection.xadd(OUTBOX, {"url": hook["url"], "job_id": job_id, "body": body,
                             "msg_id": f"msg_{uuid.uuid4().hex}", "attempt": "0"})


class Deliverer:
    """The API's delivery loop: reads the outbox as one consumer of the group, POSTs each
    entry, records the outcome and schedules a retry when it failed."""

    def __init__(self, redis: AsyncRedis, secret: str, retry_base_s: float = 1.0,
                 ttl_s: int = 7 * 24 * 3600):
        self.redis, self.secret, self.retry_base_s, self.ttl_s = redis, secret, retry_base_s, ttl_s
        self.name = f"api-{uuid.uuid4().hex[:8]}"

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(OUTBOX, GROUP, id="0", mkstream=True)
        except Exception as exc:  # BUSYGROUP: another process made it
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        grouped = False
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
            while True:
                try:
                    if not grouped:
                        await self._ensure_group()
                        grouped = True
                    await self._requeue_due()
                    await self._claim_abandoned()
                    found: Any = await self.redis.xreadgroup(GROUP, self.name, {OUTBOX: ">"},
                                                             count=16, block=1000)
                    streams = found.items() if isinstance(found, dict) else (found or [])
                    for _, entries in streams:
                        await asyncio.gather(*(self._deliver(http, entry_id, fields)
                                               for entry_id, fields in entries))
                except asyncio.CancelledError:
                    raise
                except Exception:  # Redis away: try again shortly, never die
                    log.warning("webhook delivery loop", exc_info=True)
                    await asyncio.sleep(1)

    async def _deliver(self, http: httpx.AsyncClient, entry_id: Any, fields: dict) -> None:
        f = {text(k): text(v) for k, v in fields.items()}
        attempt = int(f["attempt"]) + 1
        timestamp = int(time.time())
        body = f["body"].encode()
        headers = {"content-type": "application/json", "webhook-id": f["msg_id"],
                   "webhook-timestamp": str(timestamp),
                   "webhook-signature": signature(self.secret, f["msg_id"], timestamp, body)}
        try:
            r = await http.post(f["url"], content=body, headers=headers)
            status: int | str = r.status_code
            ok = 200 <= r.status_code < 300
        except httpx.HTTPError as exc:
            status, ok = type(exc).__name__, False
        record = RECORD + f["job_id"]
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(record, "attempts", 1)
        pipe.hset(record, mapping={"last_status": str(status), "last_attempt_at": timestamp,
                                   "last_event": json.loads(f["body"])["type"]})
        if ok:
            pipe.hincrby(record, "delivered", 1)
            outcome = "delivered"
        elif attempt <= len(RETRY_DELAYS_S):
            due = time.time() + RETRY_DELAYS_S[attempt - 1] * self.retry_base_s
            pipe.zadd(DUE, {json.dumps({**f, "attempt": str(attempt)}): due})
            outcome = "retrying"
        else:
            pipe.hincrby(record, "given_up", 1)
            outcome = "failed"
        metrics.inc(pipe, "lethe_webhook_deliveries", outcome=outcome)
        pipe.expire(record, self.ttl_s)
        pipe.xack(OUTBOX, GROUP, entry_id)
        pipe.xdel(OUTBOX, entry_id)
        await pipe.execute()

    async def _requeue_due(self) -> None:
        """Retries whose time has come go back into the outbox (each taken by one process:
        ZREM decides who)."""
        due: Any = await self.redis.zrangebyscore(DUE, 0, time.time(), start=0, num=64)
        for member in due:
            if await self.redis.zrem(DUE, member):
                await self.redis.xadd(OUTBOX, json.loads(member))

    async def _claim_abandoned(self) -> None:
        """Entries another process read and never finished (it died): this one takes them
        after a minute."""
        claimed = await self.redis.xautoclaim(OUTBOX, GROUP, self.name, min_idle_time=60_000,
                                              count=16)
        if claimed and claimed[1]:
            async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
                for entry_id, fields in claimed[1]:
                    if fields:
                        await self._deliver(http, entry_id, fields)


def record(connection: Redis, job_id: str) -> dict[str, Any] | None:
    """The job's delivery record, as ``GET /jobs/{id}`` shows it (None without a webhook)."""
    raw = connection.hgetall(RECORD + job_id)
    if not raw:
        return None
    r = {text(k): text(v) for k, v in raw.items()}
    return {"attempts": int(r.get("attempts", 0)), "delivered": int(r.get("delivered", 0)),
            "given_up": int(r.get("given_up", 0)), "last_status": r.get("last_status"),
            "last_event": r.get("last_event"),
            "last_attempt_at": int(r["last_attempt_at"]) if "last_attempt_at" in r else None}
