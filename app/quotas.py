"""Limits per caller, kept in Redis so that every API process counts the same: requests per
minute, jobs queued + running at once, images per day. A limit of 0 is no limit (the
default: the embedded single-user start has none).

Each check is one Lua script, so sixteen clients submitting at once cannot all pass a check
that only one of them should: Redis runs a script whole, one at a time.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timedelta, timezone

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from app.errors import RateLimited

# A sliding window: the timestamps of the caller's requests in the last minute. The
# (N+1)-th within any 60 s is refused, and told when the oldest one leaves the window.
_REQUESTS = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - 60000)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tonumber(oldest[2]) + 60000 - now_ms
end
redis.call('ZADD', KEYS[1], now_ms, now_ms .. '-' .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], 60000)
return -1
"""

# The caller's jobs that hold a place: queued, deferred, scheduled or started in RQ's own
# record, or reserved in the last ``grace`` ms by a submission still being queued. Places of
# jobs that ended (or expired) are given back here, when someone next asks. Reserving again
# for the same job (an upload holds its place before its bytes, then submits) holds one.
_ACTIVE = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local held = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local count = 0
for i = 1, #held, 2 do
  local status = redis.call('HGET', ARGV[3] .. held[i], 'status')
  local alive
  if status then
    alive = status == 'queued' or status == 'started' or status == 'deferred'
      or status == 'scheduled'
  else
    alive = now_ms - tonumber(held[i + 1]) < tonumber(ARGV[4])
  end
  if held[i] == ARGV[2] then alive = false end
  if alive then count = count + 1 else redis.call('ZREM', KEYS[1], held[i]) end
end
if count >= tonumber(ARGV[1]) then return -1 end
redis.call('ZADD', KEYS[1], now_ms, ARGV[2])
return count + 1
"""

RESERVE_GRACE_MS = 30_000  # a reservation whose job never appeared is given back after this
ACTIVE_RETRY_AFTER_S = 10  # jobs end when they end: a guess at when a place frees up


def _requests_key(name: str) -> str:
    return f"lethe:quota:requests:{name}"


def _active_key(name: str) -> str:
    return f"lethe:quota:active:{name}"


def _images_key(name: str, day: str) -> str:
    return f"lethe:quota:images:{name}:{day}"


async def check_request(aredis: AsyncRedis, name: str, per_minute: int) -> None:
    """Count one request of ``name``; ``RateLimited`` past ``per_minute`` in 60 s."""
    if per_minute <= 0:
        return
    wait_ms = await aredis.eval(_REQUESTS, 1, _requests_key(name), per_minute,
                                f"{time.monotonic_ns()}")
    if wait_ms >= 0:
        raise RateLimited(f"rate limit: at most {per_minute} requests a minute per key "
                          "(LETHE_RATE_LIMIT_PER_MINUTE)",
                          details={"retry_after_s": math.ceil(wait_ms / 1000)})


def reserve_job(connection: Redis, name: str, job_id: str, limit: int) -> bool:
    """Hold one of ``name``'s ``limit`` places for queued + running jobs for ``job_id``;
    ``RateLimited`` when all are taken. False when there is no limit (nothing held)."""
    if limit <= 0:
        return False
    held = connection.eval(_ACTIVE, 1, _active_key(name), limit, job_id, "rq:job:",
                           RESERVE_GRACE_MS)
    if held < 0:
        raise RateLimited(f"quota: at most {limit} jobs queued or running at once per key "
                          "(LETHE_MAX_ACTIVE_JOBS); wait for one to finish",
                          details={"retry_after_s": ACTIVE_RETRY_AFTER_S})
    return True


def release_job(connection: Redis, name: str, job_id: str) -> None:
    """Give back a place held for a job that was not queued after all."""
    connection.zrem(_active_key(name), job_id)


def _day_and_rest(now: datetime) -> tuple[str, float]:
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return now.strftime("%Y%m%d"), (tomorrow - now).total_seconds()


def take_images(connection: Redis, name: str, count: int, per_day: int) -> str | None:
    """Count ``count`` images against ``name``'s ``per_day`` (a UTC day); ``RateLimited``
    (nothing counted) when they do not fit. Returns the counter to give them back to."""
    if per_day <= 0 or count <= 0:
        return None
    day, rest_s = _day_and_rest(datetime.now(timezone.utc))
    key = _images_key(name, day)
    with connection.pipeline(transaction=True) as pipe:
        pipe.incrby(key, count)
        pipe.expire(key, 2 * 24 * 3600)
        total = pipe.execute()[0]
    if total > per_day:
        connection.decrby(key, count)
        raise RateLimited(f"quota: at most {per_day} images a day per key "
                          f"(LETHE_MAX_IMAGES_PER_DAY); {per_day - (total - count)} left "
                          f"today, {count} asked", details={"retry_after_s": math.ceil(rest_s)})
    return key


def give_back_images(connection: Redis, key: str | None, count: int) -> None:
    if key is not None:
        connection.decrby(key, count)
