"""Who is calling: API keys with names and roles, read from ``LETHE_API_KEYS``.

Each comma-separated entry is ``key`` (a user of its own, named after the key's hash so
that logs and job records never show the key), ``name:key`` (a user) or
``name:key:role`` with role ``user`` or ``admin``. Several keys may share a name: they are
one user (a key being rotated). A user sees its own jobs and deletes its own models; an
admin sees and deletes everyone's. Without keys the service is open and its one caller,
``anonymous``, is an admin: the embedded single-user start.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

ROLES = ("user", "admin")
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class Caller:
    name: str
    role: str = "user"

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def may_see(self, owner: str | None) -> bool:
        """Whether this caller may read (or cancel, or delete) what ``owner`` made."""
        return self.admin or owner == self.name


ANONYMOUS = Caller("anonymous", "admin")


def parse_keys(spec: str) -> dict[str, Caller]:
    """The callers of ``LETHE_API_KEYS`` by key; ``ValueError`` naming the entry at fault."""
    callers: dict[str, Caller] = {}
    for number, entry in enumerate((e.strip() for e in spec.split(",")), start=1):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) > 3:
            raise ValueError(f"LETHE_API_KEYS entry {number} has {len(parts)} ':'-separated "
                             "parts; write key, name:key or name:key:role")
        if len(parts) == 1:
            key = parts[0]
            name = "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]
            role = "user"
        else:
            name, key, role = parts[0], parts[1], parts[2] if len(parts) == 3 else "user"
            if not _NAME_RE.fullmatch(name):
                raise ValueError(f"LETHE_API_KEYS entry {number}: name {name!r} must match "
                                 f"{_NAME_RE.pattern}")
            if name == ANONYMOUS.name:
                raise ValueError(f"LETHE_API_KEYS entry {number}: the name 'anonymous' is "
                                 "the open service's caller; pick another")
        if role not in ROLES:
            raise ValueError(f"LETHE_API_KEYS entry {number} ({name}): role {role!r} is not "
                             f"one of {list(ROLES)}")
        if not key or any(c.isspace() for c in key):
            raise ValueError(f"LETHE_API_KEYS entry {number} ({name}): the key is empty or "
                             "holds white space")
        if key in callers:
            raise ValueError(f"LETHE_API_KEYS entry {number} ({name}): this key is given "
                             "already")
        known = {c.name: c.role for c in callers.values()}
        if known.get(name, role) != role:
            raise ValueError(f"LETHE_API_KEYS entry {number}: {name!r} has role "
                             f"{known[name]!r} in an earlier entry and {role!r} here")
        callers[key] = Caller(name, role)
    return callers
