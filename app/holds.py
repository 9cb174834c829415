"""Holds: the requests that wait in Redis (event streams, long polls), bounded per caller
and in all.

Each such request keeps a Redis connection of the API process's async pool for as long as
it waits (a queued job's event stream, for as long as the job waits), so without a bound
one key could open enough of them to take every connection, and the Redis server's too.
The bounds are per API process, as the pool is: a key past ``LETHE_MAX_HOLDS_PER_KEY`` is
answered 429, and past ``LETHE_MAX_HOLDS`` everyone is answered 503 until a hold ends.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from app.errors import RateLimited, Unavailable

RETRY_AFTER_S = 5


class Holds:
    def __init__(self, per_caller: int, total: int):
        self.per_caller, self.total = per_caller, total
        self.held: Counter[str] = Counter()

    def take(self, caller: str) -> Callable[[], None]:
        """One hold more for ``caller``, or the error that names the bound it would pass;
        returns its release, which counts once however often it is called. The API's
        event loop is one thread: no lock is needed between the check and the count."""
        if sum(self.held.values()) >= self.total:
            raise Unavailable(f"this API process holds {self.total} event streams and long "
                              "polls already (LETHE_MAX_HOLDS); try again shortly")
        if self.held[caller] >= self.per_caller:
            raise RateLimited(f"at most {self.per_caller} event streams and long polls open "
                              "at once per key (LETHE_MAX_HOLDS_PER_KEY); close one first",
                              details={"retry_after_s": RETRY_AFTER_S})
        self.held[caller] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.held[caller] -= 1
                if self.held[caller] <= 0:
                    del self.held[caller]

        return release

    @contextmanager
    def hold(self, caller: str) -> Iterator[None]:
        release = self.take(caller)
        try:
            yield
        finally:
            release()
