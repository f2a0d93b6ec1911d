"""The live list's record beside validrcptto.cdb (``CDB.sources``, JSON): what each
source gave per domain, the peaks the gate measures losses against, and the domains held
with why and since when.  Read by every build, by ``status`` from any layout; written
with the cdb, under its lock.  Also the one way this side replaces its files
(``write_atomically``)."""

from __future__ import annotations

import json
import mmap
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from . import atomicfile
from .errors import InstallError
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

    def data(self) -> dict[str, Any]:
        return {"version": 2, "sources": self.sources, "catchall": self.catchall,
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
            return cls({d: v for d, v in data.items() if isinstance(v, dict)})
        out = cls({d: v for d, v in (data.get("sources") or {}).items()
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
        return out


def read_sources(path: str) -> dict[str, Any] | None:
    """Our own file: a regular file, not followed through a symlink, size-capped."""
    try:
        fd = os.open(sources_path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = json.loads(os.read(fd, 16 << 20))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return data if isinstance(data, dict) else None


def read_record(path: str) -> LiveRecord:
    return LiveRecord.of(read_sources(path))


def save_record(path: str, record: LiveRecord) -> None:
    data = record.data()
    if read_sources(path) == json.loads(json.dumps(data)):
        return
    write_atomically(sources_path(path),
                     json.dumps(data, sort_keys=True, separators=(",", ":")).encode())


def write_atomically(path: str, data: bytes | str | mmap.mmap | None = None,
                     fill: Callable[[BinaryIO], None] | None = None) -> None:
    """``atomicfile.replace`` (mode 0644), failures as InstallError naming the file."""
    try:
        atomicfile.replace(path, data, fill, MODE)
    except OSError as err:
        raise InstallError(f"cannot write: {err.strerror or err}", path,
                           errno=err.errno) from None
