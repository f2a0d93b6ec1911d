"""qmail's ~alias/.qmail-* files and the fastforward aliases.cdb they may name."""

from __future__ import annotations

import os
from typing import Iterator

from ..errors import SourceError
from ..qmail import cdb_keys, dot_qmail_exts, fastforward_cdb, list_dir, read_text, runs
from . import Found, Notes, at


def fastforward_keys(cdb_keys_: list[str], domains: list[str]) -> list[str]:
    """Map fastforward's ``:address`` keys to validrcptto keys (pure).

    ``:user@dom`` -> ``user@dom`` when dom is local; ``:user@`` -> user at every local
    domain; ``:@dom`` -> ``@dom``; anything else is fastforward-internal and ignored."""
    local = set(domains)
    out: list[str] = []
    for key in cdb_keys_:
        if not key.startswith(":") or "@" not in key:
            continue
        user, _, dom = key[1:].rpartition("@")
        if dom == "":
            if user:
                out.extend(at([user], d)[0] for d in domains)
        elif dom in local:
            out.append(f"{user}@{dom}" if user else "@" + dom)
    return out


def alias_entries(alias_home: str, domains: list[str], notes: Notes) -> Iterator[Found]:
    """Entries of the alias user, valid at every local and alias domain."""
    if not domains:
        return
    names = list_dir(alias_home)
    if names is None:
        notes.warn(f"{alias_home}: no ~alias directory: postmaster and other qmail "
                   "aliases are not listed")
        return
    exts = list(dot_qmail_exts(names, ".qmail-"))
    plain = sorted(e for e in exts if e != "default")
    if plain:
        keys: list[str] = []
        for d in domains:
            keys.extend(at(plain, d))
        yield Found(f"qmail aliases {alias_home}", keys)
    if "default" not in exts:
        return
    default_path = os.path.join(alias_home, ".qmail-default")
    args = runs(read_text(default_path), "fastforward")
    if args is None:
        notes.warn(f"{default_path} delivers every unknown local address: "
                   f"accepting all mail for {', '.join(domains)}")
        yield Found(f"catch-all {default_path}", ["@" + d for d in domains])
        return
    cdb_path = fastforward_cdb(args)
    if cdb_path is None:
        raise SourceError("runs fastforward without naming its cdb", default_path)
    keys_ = cdb_keys(cdb_path)
    if keys_ is None:
        raise SourceError(f"runs fastforward with {cdb_path}, which does not exist "
                          "(run newaliases)", default_path)
    yield Found(f"fastforward {cdb_path}", fastforward_keys(keys_, domains))
