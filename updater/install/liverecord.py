"""The live list's record beside validrcptto.cdb (``CDB.sources``, JSON): what each
source gave per domain, the peaks the gate measures losses against, and the domains held
with why and since when.  Read by every build, by ``status`` from any layout; written
with the cdb, under its lock.  Also the one way this side replaces its files
(``write_atomically``)."""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .. import atomicfile
from ..errors import InstallError
from ..ident import Ident, of_stat
from .gate import Peak

MODE = 0o644


def sources_path(path: str) -> str:
    """The live list's record beside the cdb (JSON): what its sources gave per domain,
    the peaks the gate measures losses against, the domains held and why."""
    return path + ".sources"


@dataclass(frozen=True)
class Held:
    """A domain that keeps its last good entries: why, since when, and whether its
    source failed (cleared when it reads whole again) or the gate doubts its new list
    (cleared when the loss is gone, or by ``qmail-updater accept``)."""
    reason: str
    since: float
    failed: bool

    def line(self, domain: str) -> str:
        what = "its source fails" if self.failed else "the gate doubts its new list"
        return f"held {domain} ({what}, last good entries kept): {self.reason}"


def hold_changes(was: dict[str, Held], now: dict[str, Held]) -> list[str]:
    """A line for each hold that starts (or whose reason changed) and each that ends."""
    lines = [h.line(d) for d, h in sorted(now.items())
             if d not in was or was[d].reason != h.reason]
    return lines + [f"{d}: no longer held" for d in sorted(was.keys() - now.keys())]


@dataclass
class LiveRecord:
    """What the live list was made from, per domain (``sources_path``)."""
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    peaks: dict[str, Peak] = field(default_factory=dict)
    held: dict[str, Held] = field(default_factory=dict)
    catchall: list[str] = field(default_factory=list)     # domains whose @domain accepts
    cdb: list[int] | None = None     # the identity of the cdb this record describes
    garbage: int = 0                 # bytes of its records no lookup reaches (stablecdb)
    canonical: bool = False          # written whole by a full build: sorted, no garbage

    def garbage_of(self, live: Ident | None) -> int | None:
        """The unreachable bytes of the live file whose identity is ``live``; None when
        this record does not describe that file (written by someone else, or by a build
        that died between the two renames): then only a full walk can tell."""
        return self.garbage if live is not None and self.cdb == list(live) else None

    def canonical_for(self, live: Ident | None) -> bool:
        """Whether the live file is known to be a full build's (records in key order, all
        reachable), which is what comparing it a stretch at a time needs."""
        return self.canonical and self.garbage_of(live) == 0

    def describing(self, live: Ident | None, garbage: int, canonical: bool) -> LiveRecord:
        return dataclasses.replace(self, cdb=list(live) if live else None, garbage=garbage,
                                   canonical=canonical)

    def data(self) -> dict[str, Any]:
        return {"version": 2, "sources": self.sources, "catchall": self.catchall,
                "cdb": self.cdb, "garbage": self.garbage, "canonical": self.canonical,
                "peaks": {d: [p.count, p.lost, p.since] for d, p in sorted(self.peaks.items())},
                "held": {d: {"reason": h.reason, "since": h.since, "failed": h.failed}
                         for d, h in sorted(self.held.items())}}

    @classmethod
    def of(cls, data: Any) -> LiveRecord:
        """From the file's JSON; the first format (domain -> sources) is read as sources
        alone, and anything malformed is left out, never trusted."""
        if not isinstance(data, dict):
            return cls()
        if data.get("version") != 2:
            return cls({d: dict(v) for d, v in data.items() if isinstance(v, dict)})
        out = cls({d: dict(v) for d, v in (data.get("sources") or {}).items()
                   if isinstance(v, dict)})
        for d, p in (data.get("peaks") or {}).items():
            if isinstance(p, list) and len(p) == 3 and all(
                    isinstance(x, (int, float)) for x in p):
                out.peaks[d] = Peak(int(p[0]), int(p[1]), float(p[2]))
        for d, h in (data.get("held") or {}).items():
            if isinstance(h, dict) and isinstance(h.get("reason"), str) and \
                    isinstance(h.get("since"), (int, float)):
                out.held[d] = Held(h["reason"], float(h["since"]), bool(h.get("failed")))
        out.catchall = [d for d in data.get("catchall") or [] if isinstance(d, str)]
        cdb, garbage = data.get("cdb"), data.get("garbage")
        if isinstance(cdb, list) and len(cdb) == 5 and all(type(x) is int for x in cdb) \
                and type(garbage) is int and garbage >= 0:
            out.cdb, out.garbage = cdb, garbage
            out.canonical = data.get("canonical") is True
        return out


def read_raw(path: str) -> tuple[bytes, Ident] | None:
    """Our own file's bytes and identity: a regular file, not followed through a
    symlink, size-capped."""
    try:
        fd = os.open(sources_path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return os.read(fd, 16 << 20), of_stat(st)
    except OSError:
        return None
    finally:
        os.close(fd)


_parsed: dict[str, tuple[Ident, dict[str, Any]]] = {}    # path -> the last file parsed


def read_sources(path: str) -> dict[str, Any] | None:
    """The record's JSON (parsed again only when the file changed: the daemon reads it
    at every build, and at a million addresses it is a few hundred kilobytes)."""
    raw = read_raw(path)
    if raw is None:
        return None
    known = _parsed.get(path)
    if known is not None and known[0] == raw[1]:
        return known[1]
    try:
        data = json.loads(raw[0])
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    _parsed.clear()
    _parsed[path] = (raw[1], data)
    return data


def read_record(path: str) -> LiveRecord:
    return LiveRecord.of(read_sources(path))


def save_record(path: str, record: LiveRecord) -> None:
    text = json.dumps(record.data(), sort_keys=True, separators=(",", ":")).encode()
    raw = read_raw(path)
    if raw is not None and raw[0] == text:
        return
    write_atomically(sources_path(path), text)


def write_atomically(path: str, data: bytes | str | mmap.mmap | None = None,
                     fill: Callable[[BinaryIO], None] | None = None) -> None:
    """``atomicfile.replace`` (mode 0644), failures as InstallError naming the file."""
    try:
        atomicfile.replace(path, data, fill, MODE)
    except OSError as err:
        raise InstallError(f"cannot write: {err.strerror or err}", path,
                           errno=err.errno) from None
