"""``Idempotency-Key``: a retried submission returns the job the first one queued.

A key is remembered per caller for ``LETHE_IDEMPOTENCY_TTL_S`` (24 h), with a fingerprint
of the request (its job type and body) and the id of its job. The first request claims the
key with ``SET NX`` before it queues anything, so of twenty identical requests at once one
queues the job and nineteen wait for it and answer with its id. The same key with another
body is a 409: it is a client's bug, not a retry. A claim whose submission failed (a 4xx
from a quota, Redis away) is taken back, so the retry can succeed.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from redis import Redis

from app.errors import IdempotencyConflict, InvalidParams, shown

HEADER = "Idempotency-Key"
MAX_LENGTH = 255
WAIT_S = 5.0  # the longest a repeat waits for the first request to finish queueing

# Deletes the claim only if it is still this request's (not a later one's after expiry).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def validate(key: str | None) -> str | None:
    if key is None:
        return None
    if not (0 < len(key) <= MAX_LENGTH and all(0x21 <= ord(c) <= 0x7E for c in key)):
        raise InvalidParams(f"`{HEADER}` header must be 1 to {MAX_LENGTH} visible ASCII "
                            f"characters (no spaces), got {shown(key)}")
    return key


def fingerprint(job_type: str, body: Any) -> str:
    """What makes two requests the same: the job type and the body, as canonical JSON."""
    text = json.dumps([job_type, body], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _key(owner: str, key: str) -> str:
    return f"lethe:idempotency:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"


class Claim:
    """One request's hold on an idempotency key."""

    def __init__(self, connection: Redis, owner: str, key: str, print_: str, job_id: str,
                 ttl_s: int):
        self.connection, self.redis_key, self.ttl_s = connection, _key(owner, key), ttl_s
        self.print, self.job_id = print_, job_id
        self.value = json.dumps({"fingerprint": print_, "job": job_id, "done": False})

    def take(self) -> str | None:
        """None when this request holds the key and goes on to queue its job; else the id
        of the job an identical earlier request queued."""
        deadline = time.monotonic() + WAIT_S
        while True:
            if self.connection.set(self.redis_key, self.value, nx=True, ex=self.ttl_s):
                return None
            raw = self.connection.get(self.redis_key)
            if raw is None:
                continue  # expired or taken back in between: claim it again
            held = json.loads(raw)
            if held["fingerprint"] != self.print:
                raise IdempotencyConflict(
                    f"`{HEADER}` was used with another request (another body or route) "
                    "in the last 24 h; use a new key for a new request")
            if held["done"]:
                return held["job"]
            if time.monotonic() > deadline:
                raise IdempotencyConflict(
                    f"the first request with this `{HEADER}` is still being queued; retry")
            time.sleep(0.02)

    def done(self) -> None:
        """The job is queued: repeats now answer with it."""
        self.connection.set(self.redis_key, json.dumps(
            {"fingerprint": self.print, "job": self.job_id, "done": True}), ex=self.ttl_s)

    def release(self) -> None:
        self.connection.eval(_RELEASE, 1, self.redis_key, self.value)
