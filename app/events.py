"""A job's events, in a Redis stream per job: what `GET /jobs/{id}/events` sends and what
long polls wait on.

Workers append ``progress`` and ``preview`` events as a job runs, and the final
``succeeded`` / ``failed`` / ``canceled`` once RQ has stored the outcome (``worker.runner``);
the API appends ``canceled`` for a job canceled before it ran. A stream keeps its entries
(up to ``MAX_EVENTS``), so a client that reconnects with ``Last-Event-ID`` gets every event
after the last it saw, and one that connects late gets the history. Readers block in Redis
(``XREAD BLOCK``) instead of polling it.
"""

from __future__ import annotations

import json
from typing import Any

from redis import Redis

from app import metrics
from app.queue import text
from app.schemas import FINISHED
from app.webhooks import queue_delivery

PREFIX = "lethe:events:"
MAX_EVENTS = 2000  # approximate trim: a long erase's progress
# Previews are pictures (kilobytes each, every few steps): a stream keeps the newest few,
# enough for a late reader to see where the job is heading, so a long job with previews
# every step does not hold megabytes in Redis.
PREVIEWS_KEPT = 4
# Every event a stream may carry: ``started`` when a worker takes the job, then these.
KINDS = ("started", "progress", "preview", *FINISHED)


def key(job_id: str) -> str:
    return PREFIX + job_id


def end_key(job_id: str) -> str:
    """A stream holding only the job's final event: what long polls wait on, so progress
    does not wake them."""
    return PREFIX + job_id + ":end"


def publish(connection: Redis, job_id: str, event: str, data: dict[str, Any],
            ttl_s: int, job_meta: dict[str, Any] | None = None) -> None:
    """Append ``event`` to the job's stream; the stream lives as long as the job record.
    With the job's ``job_meta``, the event also goes to its webhook if it asked for it."""
    if job_meta and job_meta.get("webhook"):
        queue_delivery(connection, job_meta, job_id, event, data)
    pipe = connection.pipeline(transaction=False)
    pipe.xadd(key(job_id), {"event": event, "data": json.dumps(data)}, maxlen=MAX_EVENTS,
              approximate=True)
    pipe.expire(key(job_id), ttl_s)
    if event in FINISHED:
        pipe.xadd(end_key(job_id), {"event": event}, maxlen=1)
        pipe.expire(end_key(job_id), ttl_s)
    added = pipe.execute()[0]
    if event == "preview":
        connection.eval(_KEEP_NEWEST, 2, key(job_id) + ":previews", key(job_id), added,
                        PREVIEWS_KEPT, ttl_s)
    if event in FINISHED:
        metrics.safely(metrics.job_ended, connection, data, ttl_s)


# KEYS: the list of the stream's preview ids, the stream; ARGV: the new id, how many to
# keep, the list's lifetime. The oldest previews leave the stream.
_KEEP_NEWEST = """
redis.call('RPUSH', KEYS[1], ARGV[1])
while redis.call('LLEN', KEYS[1]) > tonumber(ARGV[2]) do
  redis.call('XDEL', KEYS[2], redis.call('LPOP', KEYS[1]))
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
"""


def decode(entries: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """``XREAD``/``XRANGE`` entries as (id, event, data)."""
    out = []
    for entry_id, fields in entries:
        fields = {text(k): text(v) for k, v in fields.items()}
        out.append((text(entry_id), fields.get("event", "message"),
                    json.loads(fields.get("data") or "{}")))
    return out


def decode_read(found: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """One stream's ``XREAD`` reply as (id, event, data): a list of [key, entries] (RESP2)
    or a dict of key: entries (RESP3); nothing read, an empty list."""
    if not found:
        return []
    return decode(next(iter(found.values())) if isinstance(found, dict) else found[0][1])


def newest(entries: Any) -> str:
    """The id of the newest of ``XREVRANGE key + - COUNT 1``'s entries ("0-0" when none):
    read before the job's state, so a reader starting from it misses nothing after."""
    return text(entries[0][0]) if entries else "0-0"


def valid_id(value: str | None) -> bool:
    """Whether ``value`` is a stream id a client may resume from ("<ms>-<seq>")."""
    if not value:
        return False
    ms, _, seq = value.partition("-")
    return ms.isdigit() and seq.isdigit() and len(value) <= 41
