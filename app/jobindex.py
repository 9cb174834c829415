"""Who queued which job, newest first: the index behind ``GET /jobs``.

Every job gets a number from one Redis counter when it is queued, and goes into two sorted
sets scored by it: its owner's and everyone's (what an admin lists). The number is the
page cursor: the next page is what scored below the last job shown, so a job queued while
a client pages never shifts the pages it has not read yet. Entries of jobs whose record
has expired are dropped as a listing meets them; each set keeps its newest ``KEEP`` only.
"""

from __future__ import annotations

from collections.abc import Callable

from redis import Redis
from redis.client import Pipeline
from rq.job import Job

from app.errors import InvalidParams, shown

_SEQ = "lethe:jobs:seq"
_ALL = "lethe:jobs:all"
KEEP = 100_000  # entries per set; far more than a result TTL's worth for a normal user
_BATCH = 100
MAX_SCAN = 2000  # entries one page may read past a filter before it answers what it found


def owner_key(owner: str) -> str:
    return f"lethe:jobs:owner:{owner}"


def next_number(connection: Redis) -> int:
    return int(connection.incr(_SEQ))


def add(pipe: Pipeline, owner: str, job_id: str, number: int) -> None:
    """Index ``job_id`` (in the transaction that queues it)."""
    for key in (owner_key(owner), _ALL):
        pipe.zadd(key, {job_id: number})
        pipe.zremrangebyrank(key, 0, -KEEP - 1)


def parse_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    if not (cursor.isascii() and cursor.isdigit() and 0 < len(cursor) <= 18):
        raise InvalidParams(f"`cursor` {shown(cursor)} is not a cursor this service gave "
                            "(`next_cursor` of an earlier page)")
    return int(cursor)


def page(connection: Redis, owner: str | None, *, limit: int, cursor: str | None = None,
         keep: Callable[[Job], bool] = lambda job: True) -> tuple[list[Job], str | None]:
    """Up to ``limit`` jobs of ``owner`` (everyone's: None) below ``cursor`` that ``keep``
    takes, newest first, with the cursor of the next page (None: no more)."""
    key = _ALL if owner is None else owner_key(owner)
    below = parse_cursor(cursor)
    upper = "+inf" if below is None else f"({below}"
    found: list[Job] = []
    scanned, last = 0, below
    while len(found) < limit and scanned < MAX_SCAN:
        batch: list[tuple[bytes, float]] = connection.zrevrangebyscore(  # type: ignore[assignment]
            key, upper, "-inf", start=0, num=_BATCH, withscores=True)
        if not batch:
            return found, None
        ids = [member.decode() for member, _ in batch]
        records = Job.fetch_many(ids, connection=connection)
        expired = [job_id for job_id, job in zip(ids, records, strict=True) if job is None]
        if expired:
            connection.zrem(key, *expired)
            if owner is not None:
                connection.zrem(_ALL, *expired)
        for (_, score), job in zip(batch, records, strict=True):
            scanned += 1
            last = int(score)
            if job is None or not keep(job):
                continue
            found.append(job)
            if len(found) == limit:
                break
        upper = f"({last}"
    more = connection.zrevrangebyscore(key, upper, "-inf", start=0, num=1)
    return found, (str(last) if more else None)
