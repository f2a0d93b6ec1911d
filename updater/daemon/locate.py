"""Where a running ``qmail-updater run`` keeps its files, from any layout: the
environment it runs with (``/proc/PID/environ`` of each daemon, readable by root and its
own user), a service directory's ``env/`` (daemontools' envdir), or this process's own.
``qmail-updater status`` uses it so that it finds the daemon however it was started."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

from ..limits import MAX_ENV

PREFIXES = ("UPDATER_", "VALIDRCPTTO_", "QMAIL_", "VPOPMAIL_")
SERVICE_DIRS = ("/etc/service", "/service", "/var/service")


def ours(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables that decide where the daemon's files are."""
    return {k: v for k, v in environ.items() if k.startswith(PREFIXES)}


def envdir(path: str) -> dict[str, str] | None:
    """A daemontools env directory read as envdir reads it (first line, trailing white
    space removed, NUL as newline; an empty file unsets), or None when there is none.
    Regular files only, not followed through links, each read bounded."""
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return None
    out: dict[str, str] = {}
    for name in names:
        if not name.startswith(PREFIXES):
            continue
        try:
            fd = os.open(os.path.join(path, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            import stat
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            data = os.read(fd, MAX_ENV)
        finally:
            os.close(fd)
        first = data.split(b"\n", 1)[0].rstrip(b" \t").replace(b"\0", b"\n")
        if first:
            out[name] = first.decode("utf-8", "surrogateescape")
    return out


def running() -> Iterator[tuple[int, dict[str, str]]]:
    """(pid, its variables) for every ``qmail-updater run`` whose environment this user
    may read."""
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read(MAX_ENV).split(b"\0")
            if not any(a.endswith(b"qmail-updater") for a in argv[:3]) or b"run" not in argv:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                raw = f.read(MAX_ENV)
        except OSError:
            continue
        env = {}
        for item in raw.split(b"\0"):
            key, eq, value = item.partition(b"=")
            if eq:
                env[key.decode("utf-8", "surrogateescape")] = value.decode(
                    "utf-8", "surrogateescape")
        yield pid, ours(env)


def service_envs(service: str | None) -> Iterator[tuple[str, dict[str, str]]]:
    """(where, its variables) of the daemon's service directory: ``service`` (a
    service directory, or its env/ itself), else qmail-updater under $SERVICE and the
    usual scan directories."""
    if service:
        candidates = [os.path.join(service, "env"), service]
    else:
        bases = [os.environ.get("SERVICE") or "", *SERVICE_DIRS]
        candidates = [os.path.join(b, "qmail-updater", "env") for b in bases if b]
    for path in candidates:
        env = envdir(path)
        if env:
            yield path, env
