"""The sources' answers merged into one list (pure): keys lowercased and cleaned,
duplicates removed, refusals written with the reject value unless another source
accepts the key, the site exclude file over everything, bare keys at envnoathost."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..checker import REJECT
from .qmail import ENCODING, ERRORS
from .sources import Found, Notes

_BAD = re.compile(rb"[\x00-\x09\x0b-\x20\x7f]")          # \n separates the keys


def normalise(keys: list[Any], origin: str, notes: Notes) -> list[bytes]:
    """Keys as bytes, lowercased (A-Z only), without keys no SMTP client can send
    unquoted (white space, control characters): one pass over all of a group's keys."""
    if not keys:
        return []
    if isinstance(keys[0], str):
        data = "\n".join(keys).encode(ENCODING, ERRORS)
    else:
        data = b"\n".join(keys)
    if _BAD.search(data) or data.count(b"\n") != len(keys) - 1:
        raw = [k.encode(ENCODING, ERRORS) if isinstance(k, str) else k for k in keys]
        good = [k for k in raw if not _BAD.search(k) and b"\n" not in k]
        notes.warn(f"{origin}: skipped {len(keys) - len(good)} name(s) with white space "
                   "or control characters")
        if not good:
            return []
        data = b"\n".join(good)
    return data.lower().split(b"\n")


@dataclass
class Result:
    keys: dict[bytes, int]          # key -> index into origins
    origins: list[str]
    rejects: set[bytes]
    warnings: list[str]
    seconds: float = 0.0
    domains: frozenset[bytes] = frozenset()   # the domain universe (for the install gate)
    user_origins: set[int] = field(default_factory=set)   # origins a local user controls
    user_key: Callable[[bytes], bool] | None = None       # a key a local user controls?
    # domain -> kind of source ("users", "valias", "ldap", ...) -> names it gave: the
    # install gate refuses a list in which one of them gave nothing where it gave some
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    bare: bytes | None = None       # the envnoathost domain (its keys also come bare)
    failed: dict[str, str] = field(default_factory=dict)   # domain -> its source's error
    configured: frozenset[bytes] = frozenset()   # in locals or virtualdomains (the gate)

    def is_user_key(self, key: bytes) -> bool:
        """A key of this list that a local user's own files decide (by its origin)."""
        return self.keys.get(key) in self.user_origins

    def sorted_keys(self) -> list[bytes]:
        return sorted(self.keys)

    def value(self, key: bytes) -> bytes:
        """``-`` for a rejecting key, else empty."""
        return REJECT if key in self.rejects else b""

    def items(self) -> list[tuple[bytes, bytes]]:
        return [(k, self.value(k)) for k in self.sorted_keys()]

    def origin(self, key: bytes) -> str:
        return self.origins[self.keys[key]]


def merge(groups: Iterable[Found], notes: Notes, bare_domain: str | None) -> Result:
    """Dedupe.  A key the routing refuses (``deny``) is written with the reject value
    unless another source accepts it; excluded keys (the site file) win over everything,
    and an excluded ``@domain`` removes the domain's other keys.  Keys at ``bare_domain``
    (control/envnoathost) also get a bare local-part key, since qmail delivers an address
    without ``@`` there."""
    keys: dict[bytes, int] = {}
    origins: list[str] = []
    user_origins: set[int] = set()
    denied: dict[bytes, int] = {}
    excluded: list[tuple[list[bytes], int]] = []
    for found in groups:
        index = len(origins)
        origins.append(found.origin)
        if found.user:
            user_origins.add(index)
        ks = found.keys if found.clean else normalise(found.keys, found.origin, notes)
        if found.reject:
            excluded.append((ks, index))
        elif found.deny:
            denied.update(dict.fromkeys(ks, index))
        else:
            keys.update(dict.fromkeys(ks, index))
    rejects: set[bytes] = set()
    for k, index in denied.items():
        if k not in keys:
            keys[k] = index
            rejects.add(k)
    for ks, index in excluded:
        for k in ks:
            if k.startswith(b"@"):
                for other in [o for o in keys if o.endswith(k)]:
                    del keys[other]
                    rejects.discard(other)
            keys[k] = index
            rejects.add(k)
    if bare_domain:
        suffix = b"@" + bare_domain.encode(ENCODING, ERRORS)
        if suffix not in keys:
            bare = {k[: -len(suffix)]: k for k in keys
                    if k.endswith(suffix) and not k.startswith(b"@")}
            for local, full in bare.items():
                if local not in keys:
                    keys[local] = keys[full]
                    if full in rejects:
                        rejects.add(local)
    return Result(keys, origins, rejects, notes.warnings, user_origins=user_origins)
