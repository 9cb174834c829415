"""Which workers are alive: each beats a key of its own that lives ``ttl_s``.

RQ keeps a worker registry too, but reading it (``Worker.all``) raises the socket timeout
of the reader's whole connection pool to minutes, and its keys outlive a stopped worker
by a minute. A Lethe worker beats ``lethe:worker:<name>`` every third of its lifetime
from a side thread: it counts as alive while that key lives, and again from the first beat
after a pause.
"""

from __future__ import annotations

import json
from typing import Any

from redis import Redis

NAMES = "lethe:workers"  # the names to look up; a name whose key has expired is pruned
_PREFIX = "lethe:worker:"

# One round trip, and atomic: a worker that beats between a read and the prune is never
# pruned (it would be missing until its next beat).
_ALIVE = """
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local info = redis.call('GET', ARGV[1] .. name)
  if info then
    table.insert(out, name)
    table.insert(out, info)
  else
    redis.call('SREM', KEYS[1], name)
  end
end
return out
"""


def beat(connection: Redis, name: str, queues: list[str], ttl_s: float, **info: Any) -> None:
    """Say that worker ``name`` (on ``queues``) is alive for the next ``ttl_s`` seconds;
    ``info``: what else it tells (its pipeline cache's numbers, for /metrics)."""
    with connection.pipeline(transaction=True) as pipe:
        pipe.set(_PREFIX + name, json.dumps({"queues": queues, **info}),
                 px=int(ttl_s * 1000))
        pipe.sadd(NAMES, name)
        pipe.execute()


def leave(connection: Redis, name: str) -> None:
    """A worker that stops says so, rather than lingering for ``ttl_s``."""
    with connection.pipeline(transaction=True) as pipe:
        pipe.delete(_PREFIX + name)
        pipe.srem(NAMES, name)
        pipe.execute()


def alive(connection: Redis) -> dict[str, dict[str, Any]]:
    """The live workers by name, each with the queues it listens on."""
    flat = connection.eval(_ALIVE, 1, NAMES, _PREFIX)
    return {
        (name.decode() if isinstance(name, bytes) else name): json.loads(info)
        for name, info in zip(flat[::2], flat[1::2], strict=True)
    }
