"""The qmail tree as the router sees it: accounts, homes, .qmail files and what they run.

Everything the delivery chain (``updater.build.routing``) needs from the disk comes through
``DiskView``, cached for one build: which passwd accounts qmail-getpw accepts (uid not 0,
home owned by that uid), the regular ``.qmail*`` files of a home, what such a file runs
(vdelivermail, fastforward or anything else), and the names a vdelivermail or
fastforward file accepts at a domain.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from ...errors import SourceError
from ...limits import DOTQMAIL_HEAD
from ..dotqmail import bounces, fastforward_cdb, runs
from ..inputs import Inputs, dotqmail_files
from ..qmail import ENCODING, ERRORS, Account, UsersDb, cdb_keys, list_dir, lower_ascii, read_bytes
from ..routing import Accepts, Rule
from .vpopmail import check_names

_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")



class DiskView:
    def __init__(self, accounts: list[Account], users: UsersDb, qmail_dir: str,
                 warn: Callable[[str], None], users_of: Callable[[str, str], Any] | None = None,
                 aliases_of: Callable[[str], list[str] | None] | None = None,
                 qmail_ext: bool = False, tracer: Inputs | None = None):
        # the build's record of what it read (a do-nothing one when it keeps none)
        self.tracer = tracer if tracer is not None else Inputs(recording=False)
        self.accounts: dict[str, Account] = {}
        for a in accounts:
            self.accounts.setdefault(a.name, a)
        self.users = users
        self.qmail_dir = qmail_dir
        self.warn = warn
        self.users_of = users_of            # (dir, domain) -> (origin, names)
        self.aliases_of = aliases_of        # domain -> names (MySQL valias), or None
        self.qmail_ext = qmail_ext
        self._accounts: dict[str, Account | None] = {}
        self._dotfiles: dict[str, frozenset[str]] = {}
        self._rules: dict[str, Rule] = {}
        self._accepts: dict[tuple[Rule, str, str], Accepts] = {}
        self._ff: dict[str, list[str]] = {}

    # ---- qmail-getpw
    def account(self, name: str) -> Account | None:
        if name in self._accounts:
            return self._accounts[name]
        a = self.accounts.get(name)
        ok = None
        if a is not None and a.uid != 0 and os.path.isabs(a.home):
            try:
                ok = a if os.stat(a.home).st_uid == a.uid else None
            except OSError:
                ok = None
        self._accounts[name] = ok
        return ok

    def alias_home(self) -> str:
        a = self.accounts.get("alias")
        return a.home if a is not None else os.path.join(self.qmail_dir, "alias")

    # ---- qmail-local
    def dotfiles(self, home: str, how: str) -> frozenset[str]:
        """The regular files (symlinks followed) named ``.qmail*`` in a home."""
        self.tracer.touch(home)
        hit = self._dotfiles.get(home)
        if hit is not None:
            return hit
        names = list_dir(home)
        if names is None:
            self.tracer.listed(home, how, None)
            if how == "alias":
                self.warn(f"{home}: no ~alias directory: postmaster and other qmail "
                          "aliases are not listed")
                names = []
            else:
                raise SourceError(f"home directory of {how} does not exist", home)
        self._dotfiles[home] = result = dotqmail_files(home, names)
        self.tracer.listed(home, how, result)
        return result

    def rule(self, home: str, name: str) -> Rule:
        path = os.path.join(home, name)
        self.tracer.touch(path)
        hit = self._rules.get(path)
        if hit is not None:
            return hit
        try:                # what it runs is in its first lines; a user's odd file
            data = read_bytes(path, head=DOTQMAIL_HEAD)      # (FIFO, huge, not theirs) is skipped
        except SourceError as err:
            self.warn(f"{err} (taken as a file that delivers)")
            data = None
        text = data.decode(ENCODING, ERRORS) if data is not None else None
        args = runs(text, "vdelivermail")
        if bounces(text):
            rule = Rule("bounce", path)
        elif args is not None:
            rule = Rule("vdelivermail", path, "bounce-no-mailbox" in args)
        else:
            args = runs(text, "fastforward")
            if args is not None:
                cdb = fastforward_cdb(args)
                if cdb is None:
                    raise SourceError("runs fastforward without naming its cdb", path)
                rule = Rule("fastforward", cdb)
            else:
                rule = Rule("deliver", path)
        self._rules[path] = rule
        return rule

    def accepts(self, rule: Rule, home: str, domain: str) -> Accepts:
        key = (rule, home, domain)
        if self._accepts and next(iter(self._accepts))[2] != domain:
            self._accepts.clear()           # one domain at a time: a million users
        hit = self._accepts.get(key)
        if hit is None:
            hit = self._accepts[key] = (self._vdelivermail(rule, home, domain)
                                        if rule.kind == "vdelivermail"
                                        else self._fastforward(rule, home, domain))
        return hit

    def _vdelivermail(self, rule: Rule, home: str, domain: str) -> Accepts:
        """vdelivermail finds the domain as vpopmail does (users/cdb ``+DOMAIN-``) and
        takes its users (and valiases); a domain vpopmail does not know takes none."""
        entry = self.users.prefix.get(domain + "-")
        if entry is None or os.path.normpath(entry.home) != os.path.normpath(home):
            return Accepts(f"{rule.arg}: vpopmail has no domain {domain} there", [],
                           lambda name: False)
        for name in ("vpasswd", "vpasswd.cdb"):  # (named even for MySQL: alias domains
            self.tracer.touch(os.path.join(home, name))     # share it with their domain)
        assert self.users_of is not None
        # the domain vpopmail keeps the users under, as vget_assign finds it: the user
        # field of users/assign (``+alias.example-:real.example:...``, as vaddaliasdomain
        # writes it), so an alias domain's mailboxes are its real domain's
        real = lower_ascii(entry.user) if _DOMAIN_NAME.fullmatch(entry.user or "") else domain
        origin, names = self.users_of(home, real)
        if names and isinstance(names[0], bytes):
            names = check_names(names, origin, self.warn)
        groups = [(origin, names)]
        everyone = list(names)
        if self.aliases_of is not None:                 # counted even when empty
            aliases = self.aliases_of(real) or []
            groups.append((origin.rsplit(" table ", 1)[0] + " table valias", aliases))
            everyone += aliases
        return Accepts(origin, groups, _lazy_set(everyone), self.qmail_ext)

    def _fastforward(self, rule: Rule, home: str, domain: str) -> Accepts:
        cdb = rule.arg
        self.tracer.read(cdb)
        keys = self._ff.get(cdb)
        if keys is None:
            keys = cdb_keys(cdb)
            if keys is None:
                raise SourceError(f"runs fastforward with {cdb}, which does not exist "
                                  "(run newaliases)", os.path.join(home, ".qmail-default"))
            self._ff[cdb] = keys
        names, everything = [], False
        for key in keys:
            if not key.startswith(":") or "@" not in key:
                continue
            user, _, dom = key[1:].rpartition("@")
            if dom == domain or dom == "":
                if user:
                    names.append(user)
                elif dom:
                    everything = True
        origin = f"fastforward {cdb}"
        return Accepts(origin, [(origin, names)], _lazy_set(names), False, everything,
                       ("fastforward",))


def _lazy_set(names: list[Any]) -> Callable[[str], bool]:
    """Membership in ``names`` (str, or bytes): a scan of the list (in C) for the first
    few questions, a set only when there are many, so a million users cost no set."""
    as_bytes = bool(names) and isinstance(names[0], bytes)
    box: list[Any] = [0, None]

    def contains(name: str) -> bool:
        key = name.encode(ENCODING, ERRORS) if as_bytes else name
        if box[1] is None:
            box[0] += 1
            if box[0] <= 8:
                return key in names
            box[1] = frozenset(names)
        return key in box[1]
    return contains
