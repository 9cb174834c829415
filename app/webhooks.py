"""Webhooks: a job's events POSTed to a URL its submitter gave, signed, retried for an hour.

Deliveries follow the Standard Webhooks scheme (standardwebhooks.com): headers
``webhook-id``, ``webhook-timestamp`` and ``webhook-signature: v1,<base64>``, the signature
an HMAC-SHA256 over ``"<id>.<timestamp>.<body>"`` with the tenant's own secret: each key's
name has one, made by ``POST /webhooks/secret`` and shown to it then only (a delivery one
tenant received does not verify at another's endpoint). On an open service the one
caller, ``anonymous``, may instead use ``LETHE_WEBHOOK_SECRET``, which also turns
webhooks on. A secret written ``whsec_<base64>`` is used base64-decoded, as the scheme's
libraries do.

Whoever appends a job event (``app.events.publish``) also queues its delivery here when the
job asked for that kind of event: an entry in its tenant's Redis stream, read by a
consumer group, so one API process delivers each entry even with several running, and an
entry whose process died is taken over. Tenants are served in turn, each with at most
``PER_TENANT`` deliveries in flight: a slow receiver delays its own deliveries only. A
tenant's stream holds at most ``MAX_PENDING`` entries (progress past it is dropped and
counted on the job's record). A failed attempt is scheduled again (a sorted set by due
time) with exponential back-off, ``RETRY_DELAYS_S`` long in all: more than an hour. Each
job's delivery record (attempts, last status) is a hash beside it, shown on
``GET /jobs/{id}``.

The target is checked at every attempt, not only at submission: its host is resolved once,
every address it gives must be global (unless the operator allows the host), and the
connection is made to the address checked (the URL's host goes in ``Host`` and TLS's SNI),
so a name that resolves elsewhere a second later (DNS rebinding) never reaches an internal
address.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets as random_secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from app import metrics
from app.accounts import ANONYMOUS
from app.errors import InvalidParams, shown
from app.queue import text

if TYPE_CHECKING:
    from app.submissions import Submitter

log = logging.getLogger("lethe.webhooks")

OUTBOX = "lethe:webhooks"  # before tenants had streams of their own: still drained
TENANT_OUTBOX = "lethe:webhooks:out:"  # + the job's owner
TENANTS = "lethe:webhooks:tenants"
SECRETS = "lethe:webhook:secrets"  # owner -> its signing secret
GROUP = "deliverers"
DUE = "lethe:webhooks:due"  # retries, scored by the time they are due
RECORD = "lethe:webhook:"  # + job id: the job's delivery record
EVENTS = ("started", "progress", "completed")
# Seconds before each retry (× the base): 13 attempts over 64 minutes.
RETRY_DELAYS_S = (5, 10, 20, 40, 80, 160, 320, 600, 600, 600, 600, 600)
TIMEOUT_S = 10.0
PER_TENANT = 2  # deliveries in flight per tenant
IN_FLIGHT = 64  # and in all, per API process
MAX_PENDING = 1000  # entries a tenant's stream holds before progress is dropped
CLAIM_EVERY_S = 10.0
RECORD_TTL_S = 7 * 24 * 3600

# host, port -> its addresses, in the resolver's order.
Resolve = Callable[[str, int], Awaitable[list[str]]]


class Refused(Exception):
    """A target whose host resolves to an address deliveries may not reach."""


def _internal(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return not ip.is_global or ip.is_multicast


def system_lookup(host: str, port: int) -> list[str]:
    return list(dict.fromkeys(str(info[4][0]) for info in socket.getaddrinfo(host, port)))


def check_target(url: str, allow: set[str],
                 lookup: Callable[[str, int], list[str]] = system_lookup) -> str:
    """``url`` if deliveries may go there: http(s), and not to a loopback, private,
    link-local or otherwise internal address unless its host is in ``allow``
    (``LETHE_WEBHOOK_ALLOW``): a service must not be turned into a probe of its own network.
    Checked again at every attempt (``Deliverer``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidParams(f"`webhook` must be an http(s) URL, got {shown(url)}")
    host = parts.hostname
    if host in allow:
        return url
    try:
        addresses = lookup(host, parts.port or 443)
    except (socket.gaierror, UnicodeError):
        raise InvalidParams(f"`webhook` host {host!r} does not resolve") from None
    for address in addresses:
        if _internal(address):
            raise InvalidParams(
                f"`webhook` {shown(url)} points at {address} (loopback, private or "
                "link-local); such targets need the operator's LETHE_WEBHOOK_ALLOW")
    return url


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def pinned(url: str, allow: set[str], resolve: Resolve
                 ) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Where to connect for ``url``: the URL with its host replaced by the one address
    checked, the ``Host`` header, and the request extensions that keep TLS checking the
    name. ``Refused`` naming the address where the host resolves inside."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    addresses = await resolve(host, parts.port or (443 if https else 80))
    if not addresses:
        raise Refused(f"{host} has no address")
    if host not in allow:
        inside = [a for a in addresses if _internal(a)]
        if inside:
            raise Refused(f"{host} resolves to {inside[0]}")
    address = addresses[0]
    netloc = f"[{address}]" if ":" in address else address
    if parts.port:
        netloc += f":{parts.port}"
    named = parts.netloc.rpartition("@")[2]  # host[:port] as the URL wrote it
    return (urlunsplit(parts._replace(netloc=netloc)), {"host": named},
            {"sni_hostname": host} if https else {})


def of_request(body: Any, sub: Submitter) -> dict[str, Any] | None:
    """The ``webhook`` a job-creating body of ``sub.caller`` asks for, checked; None when
    it asks for none."""
    if getattr(body, "webhook", None) is None:
        return None
    settings, owner = sub.settings, sub.caller.name
    if not settings.webhook_secret:
        raise InvalidParams("`webhook` needs the service to sign deliveries: the operator "
                            "has not set LETHE_WEBHOOK_SECRET")
    if owner != ANONYMOUS.name and not sub.redis.hexists(SECRETS, owner):
        raise InvalidParams("`webhook` needs a signing secret of your own: make one with "
                            "POST /webhooks/secret (shown once), then verify deliveries "
                            "with it")
    return {"url": check_target(body.webhook, settings.webhook_hosts),
            "events": sorted(set(body.webhook_events))}


def new_secret(redis: Redis, owner: str) -> str:
    """A fresh signing secret for ``owner``'s deliveries (replacing any before), to be
    shown once."""
    secret = "whsec_" + base64.b64encode(random_secrets.token_bytes(32)).decode()
    redis.hset(SECRETS, owner, secret)
    return secret


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


def outbox(owner: str) -> str:
    return TENANT_OUTBOX + owner


def queue_delivery(connection: Redis, job_meta: dict[str, Any], job_id: str, event: str,
                   data: dict[str, Any]) -> None:
    """Queue the delivery of ``event`` if the job asked for its kind, in its owner's
    stream. Past ``MAX_PENDING`` waiting entries the owner's progress events are dropped
    (and past twice that, any event), counted as ``dropped`` on the job's record: one
    tenant's receiver that never answers cannot grow Redis without bound."""
    hook = job_meta.get("webhook")
    kind = kind_of(event)
    if not hook or kind not in hook.get("events", ()):
        return
    owner = str(job_meta.get("owner") or ANONYMOUS.name)
    stream = outbox(owner)
    bound = 2 * MAX_PENDING if kind == "completed" else MAX_PENDING
    if int(connection.xlen(stream)) >= bound:
        with connection.pipeline(transaction=False) as pipe:
            pipe.hincrby(RECORD + job_id, "dropped", 1)
            pipe.expire(RECORD + job_id, RECORD_TTL_S)
            metrics.inc(pipe, "lethe_webhook_deliveries", outcome="dropped")
            pipe.execute()
        return
    body = json.dumps({"type": f"job.{event}", "job_id": job_id, "data": data})
    with connection.pipeline(transaction=False) as pipe:
        pipe.sadd(TENANTS, owner)
        pipe.xadd(stream, {"url": hook["url"], "job_id": job_id, "body": body,
                           "owner": owner, "msg_id": f"msg_{uuid.uuid4().hex}",
                           "attempt": "0"})
        pipe.execute()


class Deliverer:
    """The API's delivery loop: reads the tenants' streams in turn as one consumer of the
    group, POSTs each entry (at most ``per_tenant`` at once per tenant), records the
    outcome and schedules a retry when it failed."""

    def __init__(self, redis: AsyncRedis, secret: str, retry_base_s: float = 1.0,
                 ttl_s: int = RECORD_TTL_S, allow: set[str] | None = None,
                 resolve: Resolve = system_resolve, per_tenant: int = PER_TENANT):
        self.redis, self.secret, self.retry_base_s, self.ttl_s = redis, secret, retry_base_s, ttl_s
        self.allow, self.resolve, self.per_tenant = allow or set(), resolve, per_tenant
        self.name = f"api-{uuid.uuid4().hex[:8]}"
        self._grouped: set[str] = set()
        self._busy: dict[str, int] = {}  # stream -> deliveries in flight
        self._tasks: set[asyncio.Task] = set()
        # A job's events arrive in order: its deliveries take turns (a lock per job, fair,
        # taken in the order they were read), while other jobs' go on beside them.
        self._job_turns: dict[str, tuple[asyncio.Lock, int]] = {}
        self._claimed_at = 0.0

    async def _ensure_group(self, stream: str) -> None:
        if stream in self._grouped:
            return
        try:
            await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except Exception as exc:  # BUSYGROUP: another process made it
            if "BUSYGROUP" not in str(exc):
                raise
        self._grouped.add(stream)

    async def _ready(self) -> list[str]:
        """The streams with room for another delivery, every tenant's in turn."""
        if len(self._tasks) >= IN_FLIGHT:
            return []
        owners: Any = await self.redis.smembers(TENANTS)
        streams = [outbox(text(o)) for o in sorted(owners)] + [OUTBOX]
        for stream in streams:
            await self._ensure_group(stream)
        return [s for s in streams if self._busy.get(s, 0) < self.per_tenant]

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False) as http:
            try:
                while True:
                    try:
                        await self._step(http)
                    except asyncio.CancelledError:
                        raise
                    except Exception:  # Redis away: try again shortly, never die
                        log.warning("webhook delivery loop", exc_info=True)
                        await asyncio.sleep(1)
            finally:
                for task in self._tasks:
                    task.cancel()

    async def _step(self, http: httpx.AsyncClient) -> None:
        await self._requeue_due()
        if time.monotonic() - self._claimed_at > CLAIM_EVERY_S:
            await self._claim_abandoned(http)
            self._claimed_at = time.monotonic()
        ready = await self._ready()
        if not ready:  # every tenant with work is at its bound: wait for one to finish
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=1,
                                   return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(0.1)
            return
        # One entry per stream a read: tenants take turns, however many one has queued.
        # The read blocks briefly: a tenant at its bound is not in ``ready`` (nor is a
        # tenant whose first entry came during the read), and its next entry must not wait
        # out a long block on the others.
        found: Any = await self.redis.xreadgroup(GROUP, self.name, {s: ">" for s in ready},
                                                 count=1, block=50 if self._tasks else 250)
        streams = found.items() if isinstance(found, dict) else (found or [])
        for stream, entries in streams:
            for entry_id, fields in entries:
                self._start(http, text(stream), entry_id, fields)

    def _start(self, http: httpx.AsyncClient, stream: str, entry_id: Any,
               fields: dict) -> None:
        self._busy[stream] = self._busy.get(stream, 0) + 1
        task = asyncio.create_task(self._deliver(http, stream, entry_id, fields))
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            self._busy[stream] -= 1
            if not t.cancelled() and t.exception() is not None:
                log.warning("webhook delivery", exc_info=t.exception())

        task.add_done_callback(done)

    async def _secret_of(self, owner: str | None) -> str | None:
        own: Any = await self.redis.hget(SECRETS, owner) if owner else None
        if own is not None:
            return text(own)
        # Entries queued before tenants had secrets carry no owner: the service's.
        return self.secret if owner in (None, ANONYMOUS.name) else None

    async def _attempt(self, http: httpx.AsyncClient, f: dict[str, str], timestamp: int
                       ) -> tuple[int | str, bool]:
        secret = await self._secret_of(f.get("owner"))
        if secret is None:
            return "no signing secret", False
        body = f["body"].encode()
        try:
            url, host, extensions = await pinned(f["url"], self.allow, self.resolve)
        except Refused:
            return "refused: not a public address", False
        except (OSError, UnicodeError):
            return "unresolved", False
        headers = {"content-type": "application/json", "webhook-id": f["msg_id"],
                   "webhook-timestamp": str(timestamp),
                   "webhook-signature": signature(secret, f["msg_id"], timestamp, body),
                   **host}
        try:
            r = await http.post(url, content=body, headers=headers, extensions=extensions)
        except httpx.HTTPError as exc:
            return type(exc).__name__, False
        return r.status_code, 200 <= r.status_code < 300

    async def _deliver(self, http: httpx.AsyncClient, stream: str, entry_id: Any,
                       fields: dict) -> None:
        f = {text(k): text(v) for k, v in fields.items()}
        job_id = f["job_id"]
        lock, waiting = self._job_turns.get(job_id, (asyncio.Lock(), 0))
        self._job_turns[job_id] = (lock, waiting + 1)
        try:
            async with lock:
                await self._deliver_in_turn(stream, entry_id, f, http)
        finally:
            lock, waiting = self._job_turns[job_id]
            if waiting <= 1:
                del self._job_turns[job_id]
            else:
                self._job_turns[job_id] = (lock, waiting - 1)

    async def _deliver_in_turn(self, stream: str, entry_id: Any, f: dict[str, str],
                               http: httpx.AsyncClient) -> None:
        attempt = int(f["attempt"]) + 1
        timestamp = int(time.time())
        status, ok = await self._attempt(http, f, timestamp)
        record = RECORD + f["job_id"]
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(record, "attempts", 1)
        pipe.hset(record, mapping={"last_status": str(status), "last_attempt_at": timestamp,
                                   "last_event": json.loads(f["body"])["type"]})
        if ok:
            pipe.hincrby(record, "delivered", 1)
            outcome = "delivered"
        elif attempt <= len(RETRY_DELAYS_S) and status != "no signing secret":
            due = time.time() + RETRY_DELAYS_S[attempt - 1] * self.retry_base_s
            pipe.zadd(DUE, {json.dumps({**f, "attempt": str(attempt),
                                        "stream": stream}): due})
            outcome = "retrying"
        else:
            pipe.hincrby(record, "given_up", 1)
            outcome = "failed"
        metrics.inc(pipe, "lethe_webhook_deliveries", outcome=outcome)
        pipe.expire(record, self.ttl_s)
        pipe.xack(stream, GROUP, entry_id)
        pipe.xdel(stream, entry_id)
        await pipe.execute()

    async def _requeue_due(self) -> None:
        """Retries whose time has come go back into their tenant's stream (each taken by
        one process: ZREM decides who)."""
        due: Any = await self.redis.zrangebyscore(DUE, 0, time.time(), start=0, num=64)
        for member in due:
            if await self.redis.zrem(DUE, member):
                fields = json.loads(member)
                stream = fields.pop("stream", OUTBOX)
                await self.redis.xadd(stream, fields)

    async def _claim_abandoned(self, http: httpx.AsyncClient) -> None:
        """Entries another process read and never finished (it died): this one takes them
        after a minute."""
        for stream in await self._ready():
            claimed = await self.redis.xautoclaim(stream, GROUP, self.name,
                                                  min_idle_time=60_000,
                                                  count=self.per_tenant - self._busy.get(
                                                      stream, 0))
            for entry_id, fields in (claimed[1] if claimed else []):
                if fields:
                    self._start(http, stream, entry_id, fields)


def record(connection: Redis, job_id: str) -> dict[str, Any] | None:
    """The job's delivery record, as ``GET /jobs/{id}`` shows it (None without a webhook)."""
    raw = connection.hgetall(RECORD + job_id)
    if not raw:
        return None
    r = {text(k): text(v) for k, v in raw.items()}
    return {"attempts": int(r.get("attempts", 0)), "delivered": int(r.get("delivered", 0)),
            "given_up": int(r.get("given_up", 0)), "dropped": int(r.get("dropped", 0)),
            "last_status": r.get("last_status"),
            "last_event": r.get("last_event"),
            "last_attempt_at": int(r["last_attempt_at"]) if "last_attempt_at" in r else None}
