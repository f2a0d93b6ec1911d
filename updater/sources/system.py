"""System accounts (passwd) and their ~/.qmail-EXT files, for local domains."""

from __future__ import annotations

import os
from typing import Iterable, Iterator

from ..qmail import Account, dot_qmail_exts, list_dir, lower_ascii
from . import Found, Notes, at


def account_locals(account: Account, names: list[str]) -> list[str]:
    """The local parts one account answers for: ``login`` and ``login-EXT``."""
    return [account.name] + [f"{account.name}-{ext}" for ext in dot_qmail_exts(names, ".qmail-")]


def local_accounts(accounts: Iterable[Account], uid_min: int, uid_max: int,
                   domains: list[str], notes: Notes) -> Iterator[Found]:
    """Every mail account in the uid range, at every local domain.

    Like qmail-getpw, an account whose name has capitals, or whose home directory does
    not exist, receives no mail and is left out; uid 0 never counts."""
    if not domains:
        return
    for acct in accounts:
        if acct.uid == 0 or not (uid_min <= acct.uid <= uid_max):
            continue
        if acct.name != lower_ascii(acct.name) or not acct.name:
            notes.warn(f"passwd account {acct.name!r} skipped: qmail delivers only to "
                       "lowercase account names")
            continue
        names = list_dir(acct.home) if os.path.isabs(acct.home) else None
        if names is None:
            continue
        locals_ = account_locals(acct, names)
        keys: list[str] = []
        for d in domains:
            keys.extend(at(locals_, d))
        yield Found(f"passwd account {acct.name} ({acct.home})", keys)
