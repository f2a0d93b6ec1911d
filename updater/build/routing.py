"""qmail's delivery chain for one domain, and the validrcptto keys that say the same.

qmail-send turns ``user@domain`` into a local part: ``user`` for a domain in locals,
``PREPEND-user`` for a virtual domain.  qmail-lspawn looks the lowercased local part up
in users/cdb (exact ``=`` entry, else the longest ``+`` prefix); without a hit
qmail-getpw cuts the local part back at each ``-`` from the right until the rest is an
account (uid not 0, home owned by that uid, name under 32 bytes), else it takes the
``alias`` user with the whole local part as the extension.  qmail-local then looks for
``.qmail{dash}{ext}`` in that home, then the ``-default`` chain, and bounces when there
is none and the dash is not empty.  What the file found runs decides the rest:
``vdelivermail ... bounce-no-mailbox`` takes only the domain's vpopmail users,
``fastforward`` only the addresses in its cdb, anything else delivers.

The checker, given ``u@domain``, tries the exact key, then ``PREFIX-default@domain``
for each prefix of ``u`` ending in ``-`` (longest first), then ``@domain``.  Both cut
at the same ``-`` boundaries, so the whole decision fits in keys: every local part
where something specific happens (an account, a users/assign entry, a ``.qmail`` file,
a vpopmail user) is a *point*; exact points and ``-default`` prefixes are resolved
through the chain one by one, and a prefix is resolved for "any other local part"
by running the chain on a tail no name can contain (``/``: no file name has one).
A key is written only where it changes the checker's answer: a refusal under a refusal
and an acceptance under an acceptance are left out, and a refusal under an acceptance
is written as a ``-`` key.

Everything here is pure: the file system comes in through a ``View``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from .inputs import Inputs
from .localdelivery import GETPW_USERLEN, TAIL, getpw, qmail_search, safe_ext, spellings
from .qmail import ENCODING, ERRORS, Account, UsersDb, lower_ascii, lspawn_lookup


class Target(NamedTuple):
    """Where qmail-lspawn sends a local part: a home, the dash and the extension."""
    home: str
    dash: str
    ext: str
    how: str          # "users/assign line 3", "account joe", "alias"
    uid: int | None   # None for users/cdb entries (the admin chose them)


# --------------------------------------------------------------------------- the tree

class Rule(NamedTuple):
    """What a .qmail file does with the addresses that reach it."""
    kind: str                 # "deliver", "bounce", "vdelivermail", "fastforward"
    arg: str = ""             # the fastforward cdb
    bounce: bool = False      # vdelivermail ... bounce-no-mailbox


class Accepts(NamedTuple):
    """The $DEFAULT values a vdelivermail or fastforward file accepts at one domain."""
    origin: str
    groups: list[tuple[str, list[Any]]]  # [(origin, names)] to list in bulk (names: str,
                                        # or lowercased bytes)
    contains: Callable[[str], bool]     # for one name
    ext: bool = False                   # each name also takes "-anything" (qmail-ext)
    everything: bool = False            # fastforward's ":@domain"
    kinds: tuple[str, ...] = ("users", "valias")     # what each group is (install gate)


def accepted(acc: Accepts, default: str) -> bool:
    if acc.everything or acc.contains(default):
        return True
    if acc.ext:
        dash = default.rfind("-")
        while dash != -1:
            if acc.contains(default[:dash]):
                return True
            dash = default.rfind("-", 0, dash)
    return False


class View(Protocol):
    tracer: Inputs                                           # the record of what was read
    def account(self, name: str) -> Account | None: ...      # qmail-getpw's rule, cached
    def dotfiles(self, home: str, how: str) -> frozenset[str]: ...
    def rule(self, home: str, name: str) -> Rule: ...
    def accepts(self, rule: Rule, home: str, domain: str) -> Accepts: ...
    def alias_home(self) -> str: ...


class Answer(NamedTuple):
    ok: bool
    origin: str
    user: bool = False      # decided by a local user's own .qmail files (their home)


@dataclass
class DomainKeys:
    """One domain's answers: exact local parts, ``-default`` prefixes ("" stands for the
    whole domain), and bulk groups (vpopmail users, fastforward entries) listed as is."""
    exact: dict[str, Answer] = field(default_factory=dict)
    prefix: dict[str, Answer] = field(default_factory=dict)
    bulk: list[tuple[str, list[Any]]] = field(default_factory=list)  # (origin, local parts)
    sources: dict[str, int] = field(default_factory=dict)   # kind -> names it gave


# --------------------------------------------------------------------------- the router

class _Points:
    """The local parts where something specific happens at one domain: exact points,
    and ``-default`` prefixes (``todo``: the prefixes not yet resolved)."""

    def __init__(self, exact: set[str]):
        self.exact = exact
        self.prefixes: set[str] = {""}
        self.todo: list[str] = []

    def prefix(self, p: str) -> None:
        self.prefixes.add(p)
        self.todo.append(p)

    def point(self, u: str) -> None:
        if u.endswith("-default"):          # that key is also a -default key
            if u[:-7] not in self.prefixes:
                self.prefix(u[:-7])
        elif u:
            self.exact.add(u)


class Router:
    """Resolves local parts through users/cdb, qmail-getpw and qmail-local."""

    def __init__(self, users: UsersDb, view: View, accounts: list[Account],
                 uid_min: int, uid_max: int, warn: Callable[[str], None]):
        self.users = users
        self.view = view
        self.close: Callable[[], None] = lambda: None   # the user lists' connection
        self.uid_min, self.uid_max = uid_min, uid_max
        self.warn = warn
        self.exact_keys = sorted(users.exact)
        self.prefix_keys = sorted(users.prefix)
        names = []
        for a in accounts:
            n = a.name
            if n and n == lower_ascii(n) and "/" not in n and \
                    len(n.encode(ENCODING, ERRORS)) < GETPW_USERLEN:
                names.append(n)
        self.account_names = sorted(set(names))
        self.warned: set[str] = set()

    # ---- one local part
    def target(self, local: str) -> Target:
        local = lower_ascii(local)
        hit = lspawn_lookup(self.users, local)
        if hit is not None:
            entry, rest = hit
            where = f"{self.users.source} line {entry.line}" if entry.line else \
                f"{self.users.source} entry {('=' if entry.exact else '+') + entry.local!r}"
            return Target(entry.home, entry.dash, entry.ext + rest, where, None)
        found = getpw(local, lambda n: self.view.account(n) is not None)
        if found is None:
            return Target(self.view.alias_home(), "-", local, "alias", None)
        name, dash, ext = found
        acct = self.view.account(name)
        assert acct is not None                     # getpw found it
        # the uid range is the admin's filter for system accounts; alias is qmail's own
        return Target(acct.home, dash, ext, f"account {name}",
                      None if name == "alias" else acct.uid)

    def resolve(self, local: str, domain: str) -> Answer:
        """Would qmail deliver local part ``local`` (after qmail-send) at ``domain``?"""
        t = self.target(local)
        if t.uid is not None and not (self.uid_min <= t.uid <= self.uid_max):
            return Answer(False, f"{t.how}: uid {t.uid} is outside the mail uid range")
        user = t.uid is not None and t.dash != ""        # an extension in a user's home
        names = self.view.dotfiles(t.home, t.how)
        found = qmail_search(t.dash, t.ext, names)
        if found is None:
            if t.dash:
                return Answer(False, f"no .qmail file in {t.home} ({t.how})", user)
            return Answer(True, f"{t.how} ({t.home}): default delivery")
        name, at = found
        origin = f"{t.home}/{name}"
        rule = self.view.rule(t.home, name)
        if rule.kind == "bounce":
            return Answer(False, f"{origin}: bounces every message", user)
        if at is None:
            return Answer(True, origin, user)
        if rule.kind == "deliver" or (rule.kind == "vdelivermail" and not rule.bounce):
            return Answer(True, origin, user)
        default = lower_ascii(t.ext[at:])
        acc = self.view.accepts(rule, t.home, domain)
        return Answer(accepted(acc, default), acc.origin, user)

    def user_owned(self, local: str) -> bool:
        """Is local part ``local`` (after qmail-send) decided by a local user's own
        files, i.e. an extension address in an account's home?  (``-default`` keys:
        pass the prefix followed by TAIL.)"""
        t = self.target(local)
        return t.uid is not None and t.dash != ""

    # ---- one domain
    def domain(self, domain: str, prepend: str, singles: dict[str, str] | None = None
               ) -> DomainKeys:
        """Every answer for ``domain``, whose local part ``user`` qmail-send turns into
        ``prepend + user`` (``prepend`` is "" for locals, else ``PREPEND-``); ``singles``
        maps a user to the local part a ``user@domain:prepend`` line gives it."""
        singles = singles or {}
        points = _Points(set(singles))
        self._seed(points, domain, prepend)
        out = DomainKeys()
        regions = self._walk(points, domain, prepend, out)
        for u in points.exact:
            out.exact[u] = self.resolve(singles.get(u, prepend + u), domain)
        for p, acc, lead in regions:
            self._bulk(out, p, acc, lead, points.prefixes)
        _prune(out)
        return out

    def _seed(self, points: _Points, domain: str, prepend: str) -> None:
        """The points users/cdb and the accounts give at a domain."""
        n = len(prepend)
        for key in _starting(self.exact_keys, prepend):
            points.point(key[n:])
        for key in _starting(self.prefix_keys, prepend):
            if len(key) > n and key[-1] in self.users.wild:
                rest = key[n:]
                if rest.endswith("-"):
                    points.prefix(rest)
                else:
                    points.point(rest)
                    if key not in self.warned:
                        self.warned.add(key)
                        self.warn(f"{self.users.source}: prefix {key!r} does not end in '-': "
                                  f"of the addresses it takes at {domain}, only {rest}@{domain} "
                                  "is listed")
        for name in _starting(self.account_names, prepend):
            if len(name) > n:
                points.point(name[n:])
                points.prefixes.add(name[n:] + "-")

    def _walk(self, points: _Points, domain: str, prepend: str, out: DomainKeys
              ) -> list[tuple[str, Accepts, str]]:
        """Resolve every prefix, finding the points its home's ``.qmail`` files add;
        returns the regions a vdelivermail or fastforward file lists in bulk."""
        regions: list[tuple[str, Accepts, str]] = []
        todo = points.todo
        todo.extend(points.prefixes)
        while todo:
            p = todo.pop()
            if p in out.prefix:
                continue
            local = prepend + p + TAIL
            out.prefix[p] = self.resolve(local, domain)
            t = self.target(local)
            if t.uid is not None and not (self.uid_min <= t.uid <= self.uid_max):
                continue
            names = self.view.dotfiles(t.home, t.how)
            base = ".qmail" + t.dash + safe_ext(t.ext[:-len(TAIL)])
            for fname in names:
                x = fname[len(base):]
                if fname.startswith(base) and x == lower_ascii(x) and "." not in x:
                    for spelling in spellings(x):
                        points.point(p + spelling)
            found = qmail_search(t.dash, t.ext, names)
            if found is not None and found[1] is not None:
                rule = self.view.rule(t.home, found[0])
                if rule.kind == "fastforward" or (rule.kind == "vdelivermail" and rule.bounce):
                    lead = lower_ascii(t.ext[found[1]:-len(TAIL)])
                    regions.append((p, self.view.accepts(rule, t.home, domain), lead))
        return regions

    def _bulk(self, out: DomainKeys, region: str, acc: Accepts, lead: str,
              prefixes: set[str]) -> None:
        """The names a vdelivermail/fastforward region accepts, as local parts; a name
        that a longer prefix or an exact point routes elsewhere is left to that."""
        if acc.everything:
            return
        deeper = any(len(q) > len(region) and q.startswith(region) for q in prefixes)
        for i, (origin, names) in enumerate(acc.groups):
            kind = acc.kinds[min(i, len(acc.kinds) - 1)]
            out.sources[kind] = out.sources.get(kind, 0) + len(names)
            if not names:
                continue
            as_bytes = isinstance(names[0], bytes)
            enc = (lambda t: t.encode(ENCODING, ERRORS)) if as_bytes else str
            dec = (lambda b: b.decode(ENCODING, ERRORS)) if as_bytes else str
            joined: Any = (b"\n" if as_bytes else "\n").join(names)
            if lead:
                lead_ = enc(lead)
                names = [w[len(lead_):] for w in names if w.startswith(lead_)]
            if region:
                region_ = enc(region)
                names = [region_ + w for w in names]
            # what the region does not decide: exact points, names that are -default
            # keys, names under a longer -default prefix
            skip = {enc(u) for u in out.exact}
            if (b"-" if as_bytes else "-") in joined:
                for u in names:
                    s = dec(u)
                    if "-" in s and (s.endswith("-default") or
                                     (deeper and _under(s, region, prefixes))):
                        skip.add(u)
            keys = [u for u in names if u not in skip] if skip else list(names)
            if acc.ext and i == 0:                   # the users, not their aliases
                tail = enc("-default")
                keys += [k + tail for k in keys if dec(k) + "-" not in out.prefix]
            if keys:
                out.bulk.append((origin, keys))


def _starting(sorted_keys: list[str], prefix: str) -> list[str]:
    lo = bisect.bisect_left(sorted_keys, prefix)
    out = []
    for k in sorted_keys[lo:]:
        if not k.startswith(prefix):
            break
        out.append(k)
    return out


def _under(u: str, region: str, prefixes: set[str]) -> bool:
    """Is ``u`` under a longer ``-default`` prefix than ``region``?"""
    dash = u.rfind("-")
    while dash >= len(region):
        if u[:dash + 1] in prefixes:
            return True
        dash = u.rfind("-", 0, dash)
    return False


def fallback(local: str, prefix: dict[str, Answer], own: bool = False) -> Answer | None:
    """The ``-default`` key (or ``@domain``) the checker decides ``local`` by when it has
    no key of its own (``own``: ``local`` is itself a prefix, which does not count)."""
    dash = local.rfind("-", 0, len(local) - 1) if own else local.rfind("-")
    while dash != -1:
        hit = prefix.get(local[:dash + 1])
        if hit is not None:
            return hit
        dash = local.rfind("-", 0, dash)
    return prefix.get("") if local else None


def _redundant(ans: Answer, parent: Answer | None) -> bool:
    """The checker would answer the same without the key: a refusal under a refusal (or
    under nothing), an acceptance under an acceptance."""
    return ans.ok == (parent is not None and parent.ok)


def _prune(out: DomainKeys) -> None:
    """Leave out the keys the checker would answer the same way without."""
    prefix = out.prefix
    drop_p = [p for p, a in prefix.items() if _redundant(a, fallback(p, prefix, own=True))]
    drop_u = [u for u, a in out.exact.items() if _redundant(a, fallback(u, prefix))]
    for u in drop_u:
        del out.exact[u]
    for p in drop_p:
        del prefix[p]
