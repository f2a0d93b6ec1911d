"""What the trigger FIFO's lines ask for (pure, no I/O): ``onchange_target`` reads the
domains out of a vpopmail onchange line, and whether it is an addition (applied without
the quiet period); ``fifo_requests`` turns one read of the FIFO into requests."""

from __future__ import annotations

import re

from ..limits import MAX_DOMAIN, MAX_FIFO_LINES, MAX_LOCAL, MAX_WORDS
from ..textsafe import printable
from .events import Requested, Targeted

# What vpopmail's onchange lines name.  The hook writes its arguments joined by spaces, so
# one line reads the same from both versions: 5.4 passes the command and one string
# (``valias_insert`` ``sales@d - alice@d``), 5.6 the command and three fields, the last
# empty (``add_user`` ``alice@d`` ``-`` ``''``; ``add_alias_domain`` ``d2`` ``d1`` ``''``).
# A command whose first argument is an address changes that address's domain; the domain
# commands name one domain, or two (``add_alias_domain D R``, ``del_domain D alias of R``).
# Additions are applied at once; removals (``del_user`` and ``valias_delete`` are
# reported before the change is made) after the quiet period.
ADDITIONS = re.compile(r"(add|mod)(_.*)?|.*_(insert|add)|add.*")
DOMAIN_COMMANDS = {"valias_delete_domain", "add_domain", "del_domain", "add_alias_domain"}
_DOMAIN = re.compile(r"[a-z0-9][a-z0-9._-]*")
_LOCAL = re.compile(r"[^\s@/\x00-\x1f\x7f]+")


def onchange_target(line: str) -> tuple[frozenset[str], bool, frozenset[str]] | None:
    """(domains, fast, addresses) for an onchange request that names what it changes,
    else None (pure).  ``fast``: an addition, applied without the quiet period;
    ``addresses``: the one address a user or alias command names (its row is all a
    database source needs to read again), empty for a domain command."""
    words = line.split(None, MAX_WORDS)
    if words and words[-1] in ("before", "after"):   # the two-stage variant's last word
        words = words[:-1]
    if len(words) < 2 or not words[0].replace("_", "").isalpha():
        return None
    command, first = words[0], words[1]
    if command in DOMAIN_COMMANDS:
        names = [first]
        if command == "add_alias_domain" and len(words) >= 3:
            names.append(words[2])                          # D R: the real domain too
        elif command == "del_domain" and words[2:4] == ["alias", "of"] and len(words) >= 5:
            names.append(words[4])                          # D alias of R
    elif "@" in first:
        names = [first.rpartition("@")[2]]
    else:
        return None
    address = first.translate(_LOWER) if command not in DOMAIN_COMMANDS else ""
    domains = frozenset(n.translate(_LOWER) for n in names)
    if not all(0 < len(d) <= MAX_DOMAIN and _DOMAIN.fullmatch(d) for d in domains):
        return None
    fast = command != "valias_delete_domain" and ADDITIONS.fullmatch(command) is not None
    local = address.rpartition("@")[0]
    if address and not (0 < len(local) <= MAX_LOCAL and _LOCAL.fullmatch(local)):
        address = ""                        # an odd name: its whole domain is read again
    return domains, fast, frozenset({address} if address else ())


_LOWER = {c: c + 32 for c in range(65, 91)}


def fifo_requests(data: bytes, dropped: int, incremental: bool) -> list[Targeted | Requested]:
    """One read of the FIFO: an onchange line naming its domain is a targeted request
    (when builds may be incremental); the other lines make one request for a full
    build.  A line never goes silently: what a burst pushed out of the read
    (``dropped`` bytes, or the lines past MAX_FIFO_LINES) becomes a full build request,
    which the FIFO floor paces like any other."""
    lines = data.split(b"\n")
    if dropped:
        lines = lines[1:]                   # the first one lost its beginning
    out: list[Targeted | Requested] = []
    others = []
    for raw in lines[:MAX_FIFO_LINES]:
        line = raw.strip()
        if not line:
            continue
        target = onchange_target(line[:300].decode("ascii", "replace")) if incremental \
            else None
        if target is not None:
            out.append(Targeted("fifo: " + printable(line[:200]), *target))
        else:
            others.append(line)
    if dropped or len(lines) > MAX_FIFO_LINES:
        others.insert(0, b"a burst of lines, some not read (%d bytes)" % (
            dropped + sum(len(x) + 1 for x in lines[MAX_FIFO_LINES:])))
    if others or not data.strip():
        text = printable(b"; ".join(others)[:200])
        out.append(Requested("fifo: " + (text or "(empty)"), fifo=True))
    return out
