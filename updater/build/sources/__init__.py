"""The sources of valid addresses.

Each source yields ``Found`` groups: the keys one file (or one account, one directory)
contributes, tagged with where they came from.  Grouping per origin instead of one
object per address keeps a million-address build fast and small, while ``--origins``
and ``--diff`` can still say *why* a key is there.  Sources read files; the rules
they apply live in ``updater.build.qmail`` and are pure.  A source that cannot read what it
needs raises ``SourceError`` and the whole build fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..qmail import ENCODING, ERRORS


@dataclass(slots=True)
class Found:
    origin: str                      # "vpasswd /home/vpopmail/domains/x/vpasswd", ...
    keys: list[Any]                  # keys (str or bytes): user@domain, user, @domain
    reject: bool = False             # written with the value "-" (site exclude file)
    clean: bool = False              # bytes keys already lowercased and checked
    deny: bool = False               # qmail would bounce these ("-" unless accepted elsewhere)
    user: bool = False               # decided by a local user's own files (not the gate's)


@dataclass(slots=True)
class Notes:
    """Warnings a build wants the admin to see (catch-all domains, skipped names)."""
    warnings: list[str] = field(default_factory=list)

    def warn(self, text: str) -> None:
        self.warnings.append(text)


def at(names: list[Any], domain: str) -> list[Any]:
    """``name@domain`` for each name; bytes names give bytes keys."""
    if names and isinstance(names[0], bytes):
        bsuffix = b"@" + domain.encode(ENCODING, ERRORS)
        return [n + bsuffix for n in names]
    suffix = "@" + domain
    return [n + suffix for n in names]
