"""tcpserver's access rules: the cdb that ``tcprules`` compiles, read as ``tcpserver -x``.

Lookup order for a connection (the first key found decides): ``INFO@IP`` when there is
remote info, the IP, ``=HOST`` when the remote host is known, the IP's prefixes ending
in ``.`` (``10.1.2.``, ``10.1.``, ``10.``; ``:`` for IPv6), ``=`` host suffixes, then
the empty key.  A value ``D…`` denies; otherwise it is a run of ``+VAR=value\\0``
settings (``-VAR\\0`` unsets); an empty value or no key at all is a plain allow...
except that with no key at all tcpserver allows too.  Pure: the cdb comes in as a
``get(key) -> bytes | None`` function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple


class Rule(NamedTuple):
    allow: bool
    env: dict[str, str | None]      # None: unset the variable
    key: bytes | None               # the key that decided (None: no rule matched)


def keys(ip: str, host: str | None = None, info: str | None = None) -> Iterator[bytes]:
    """The keys tcpserver tries, in order."""
    if info:
        yield f"{info}@{ip}".encode()
    yield ip.encode()
    if host:
        yield b"=" + host.encode()
    sep = ":" if ":" in ip else "."
    end = len(ip)
    while True:
        end = ip.rfind(sep, 0, end)
        if end <= 0:
            break
        yield ip[:end + 1].encode()
    if host:
        dot = host.find(".")
        while dot != -1:
            yield b"=" + host[dot:].encode()
            dot = host.find(".", dot + 1)
    yield b""


def parse(value: bytes) -> tuple[bool, dict[str, str | None]]:
    """A rule's value: deny, or the variables it sets."""
    if value.startswith(b"D"):
        return False, {}
    env: dict[str, str | None] = {}
    for item in value.split(b"\0"):
        if item.startswith(b"+"):
            name, _, val = item[1:].partition(b"=")
            env[name.decode("utf-8", "surrogateescape")] = val.decode("utf-8", "surrogateescape")
        elif item.startswith(b"-") and len(item) > 1:
            env[item[1:].decode("utf-8", "surrogateescape")] = None
    return True, env


def lookup(get: Callable[[bytes], bytes | None], ip: str, host: str | None = None,
           info: str | None = None) -> Rule:
    for key in keys(ip, host, info):
        value = get(key)
        if value is not None:
            allow, env = parse(value)
            return Rule(allow, env, key)
    return Rule(True, {}, None)


def relays(rule: Rule | None, env: Mapping[str, str]) -> bool:
    """Whether a session gets RELAYCLIENT: from the rule (which may also unset it: None),
    else from the server's own environment."""
    given = rule.env if rule is not None else {}
    return given["RELAYCLIENT"] is not None if "RELAYCLIENT" in given \
        else "RELAYCLIENT" in env
