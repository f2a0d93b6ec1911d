"""Where the list is published: the syntax of ``UPDATER_PUBLISH``'s targets (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

_SSH = re.compile(r"^(?:(?P<user>[^@:/\s]+)@)?(?P<host>\[[^\]]+\]|[^@:/\s\[]+)"
                  r":(?P<path>/(?!/)\S+)$")
_RSYNCD = re.compile(r"^rsync://(?P<host>\[[^\]]+\]|[^/:\s]+)(?::(?P<port>\d+))?/(?P<path>\S+)$")


@dataclass(frozen=True)
class Target:
    spec: str                 # as the admin wrote it: also its name in status and metrics
    kind: str                 # "ssh" or "rsyncd"


def parse_targets(text: str) -> list[Target]:
    """The targets of UPDATER_PUBLISH; a malformed one is a ConfigError naming it."""
    out: list[Target] = []
    for spec in text.replace(",", " ").split():
        if _RSYNCD.match(spec):
            kind = "rsyncd"
        elif _SSH.match(spec):
            kind = "ssh"
        else:
            raise ConfigError(f"UPDATER_PUBLISH: {spec!r} is neither [user@]host:/path nor "
                              "rsync://host[:port]/module/path")
        if spec not in {t.spec for t in out}:
            out.append(Target(spec, kind))
    return out
