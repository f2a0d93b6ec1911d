"""Virtual domains (control/virtualdomains): find the domain's directory, then list it.

qmail rewrites ``user@domain`` to the local address ``PREPEND-user``; qmail-lspawn
finds its home through users/assign (longest ``+`` prefix) or the passwd account
PREPEND, and qmail-local looks for ``.qmail{dash}{ext}user`` there.  What that
directory's default file runs decides what we list:

* ``vdelivermail ... bounce-no-mailbox``: a vpopmail domain that bounces unknown users:
  every vpopmail user, every ``.qmail-*`` file (valiases, ezmlm lists), and
  ``user-default`` per user when vpopmail was built with qmail-ext;
* ``vdelivermail`` without it, or any other default file: a catch-all, ``@domain``;
* no default file: each ``.qmail-EXT`` file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

from ..errors import SourceError
from ..qmail import (Account, AssignIndex, MapEntry, assign_lookup, dot_qmail_exts, list_dir,
                     read_text, runs)
from . import Found, Notes, at
from .vpopmail import check_names, read_users


@dataclass(frozen=True)
class Home:
    path: str        # the domain's directory
    prefix: str      # file-name prefix of its .qmail files, e.g. ".qmail-"
    how: str         # how it was found, for messages


def find_home(domain: str, entry: MapEntry, assign: AssignIndex, accounts: dict[str, Account],
              vpopmail_dir: str) -> Home:
    prepend = entry.right
    hit = assign_lookup(assign, prepend + "-", exact=False)
    if hit is not None:
        a, rest = hit
        return Home(a.home, ".qmail" + a.dash + a.ext + rest, f"users/assign line {a.line}")
    acct = accounts.get(prepend)
    if acct is not None:
        return Home(acct.home, ".qmail-", f"passwd account {prepend}")
    domains = os.path.join(vpopmail_dir, "domains")
    candidates = [os.path.join(domains, domain)]
    for sub in sorted(list_dir(domains) or []):
        if len(sub) <= 2 and sub != domain:          # vpopmail's hashed layout: domains/X/DOMAIN
            candidates.append(os.path.join(domains, sub, domain))
    for c in candidates:
        if os.path.isdir(c):
            return Home(c, ".qmail-", "vpopmail domains directory")
    raise SourceError(f"no directory for {domain} (prepend {prepend!r} is not in users/assign, "
                      "not a passwd account, and not under the vpopmail domains dir)",
                      entry.path, entry.line)


def file_users(vuserinfo: str | None):
    """The default user lookup: the domain's vpasswd files (``vpopmail.read_users``)."""
    return lambda home, domain: read_users(home, domain, vuserinfo)


def virtual_entries(domain: str, home: Home, users_of, qmail_ext: bool,
                    notes: Notes, aliases_of=None) -> Iterator[Found]:
    """``users_of(dir, domain) -> (origin, names)`` lists a vpopmail domain's users;
    ``aliases_of(domain) -> names`` its valiases when they live in a database."""
    names = list_dir(home.path)
    if names is None:
        raise SourceError(f"directory of {domain} ({home.how}) does not exist", home.path)
    exts = sorted(dot_qmail_exts(names, home.prefix))
    if "default" not in exts:
        yield Found(f".qmail files {home.path}", at(exts, domain))
        return
    default_path = os.path.join(home.path, home.prefix + "default")
    args = runs(read_text(default_path), "vdelivermail")
    if args is None or "bounce-no-mailbox" not in args:
        what = "vdelivermail without bounce-no-mailbox" if args is not None else "it"
        notes.warn(f"{default_path}: {what} accepts every address: @{domain} is a catch-all")
        yield Found(f"catch-all {default_path}", ["@" + domain])
        return
    origin, users = users_of(home.path, domain)
    clean = bool(users) and isinstance(users[0], bytes)
    if clean:
        users = check_names(users, origin, notes.warn)
    yield Found(origin, at(users, domain), clean=clean)
    if qmail_ext:
        dflt = b"-default" if clean else "-default"
        yield Found(origin + " (qmail-ext)", at([u + dflt for u in users], domain), clean=clean)
    if aliases_of is not None:
        aliases = aliases_of(domain)
        if aliases:
            yield Found(origin.rsplit(" table ", 1)[0] + " table valias", at(aliases, domain))
    files = [e for e in exts if e != "default"]
    if files:
        yield Found(f".qmail files {home.path}", at(files, domain))
