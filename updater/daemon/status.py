"""The daemon's status: the JSON file ``qmail-updater status`` reads, and the
node-exporter textfile, both written atomically (``atomicfile``)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .. import atomicfile
from ..errors import UpdaterError
from ..limits import HEARTBEAT

if TYPE_CHECKING:
    from ..config import Settings



def write(path: str, record: dict[str, Any], prom_file: str = "") -> None:
    """The status file, and the textfile when ``prom_file`` is set (OSError on failure)."""
    atomicfile.replace(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    if prom_file:
        atomicfile.replace(prom_file, prometheus_text(record))


def prometheus_text(st: dict[str, Any]) -> str:
    """The node-exporter textfile for a status record, in prometheus-client's format
    (written by ``atomicfile.replace``, not ``write_to_textfile``, whose temporary file has a
    predictable name a local user could plant a symlink at)."""
    from prometheus_client import generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import CollectorRegistry

    class Status:
        def collect(self) -> Iterator[Any]:
            p = "qmail_updater_"
            for name, text, value in (
                    ("last_build_success", "1 if the last build succeeded",
                     0 if st["result"] == "failed" else 1),
                    ("last_build_timestamp_seconds", "when the last build ran", st["time"]),
                    ("entries", "keys in the live validrcptto.cdb", st.get("entries") or 0),
                    ("last_build_added", "keys added by the last build", st.get("added", 0)),
                    ("last_build_removed", "keys removed by the last build",
                     st.get("removed", 0)),
                    ("last_build_duration_seconds", "how long the last build took",
                     st["seconds"]),
                    ("pending_requests", "build requests waiting now",
                     st.get("pending") or 0),
                    ("last_build_incremental", "1 if the last build redid only some domains",
                     int(bool(st.get("incremental")))),
                    ("held_domains", "domains keeping their last good entries (a source "
                     "failed, or the gate doubts their new list)", len(st.get("held") or {}))):
                yield GaugeMetricFamily(p + name, text, value=value)
            yield CounterMetricFamily(p + "builds", "builds since the daemon started",
                                      value=st.get("builds") or 0)
            yield CounterMetricFamily(p + "incremental_builds",
                                      "incremental builds since the daemon started",
                                      value=st.get("incremental_builds") or 0)
            targets = st.get("publish") or {}
            for name, text, value in (
                    ("up_to_date", "1 if the target holds the live list",
                     lambda t: int(t["up_to_date"])),
                    ("lag_seconds", "how long the target has been behind the live list",
                     lambda t: t["lag_seconds"]),
                    ("last_success_timestamp_seconds", "the last push that worked",
                     lambda t: t["last_success"] or 0),
                    ("failures", "failed pushes since the last success",
                     lambda t: t["failures"])):
                if targets:
                    fam = GaugeMetricFamily(p + "publish_" + name, text, labels=["target"])
                    for spec, t in sorted(targets.items()):
                        fam.add_metric([spec], value(t))
                    yield fam

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Status())
    return generate_latest(registry).decode()


STATUS_KEYS = ("time", "result", "seconds")


def read_status(path: str) -> dict[str, Any] | None:
    """The status file, None when there is none; a partial or corrupt file raises
    UpdaterError (one line, exit 1) instead of a traceback."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UpdaterError(f"cannot read status: {err.strerror}", path) from None
    try:
        st = json.loads(data)
    except ValueError:
        st = None
    if not isinstance(st, dict) or any(k not in st for k in STATUS_KEYS) or \
            not all(isinstance(st[k], (int, float)) for k in ("time", "seconds")):
        raise UpdaterError("status file is partial or corrupt", path)
    return st


def describe(st: dict[str, Any]) -> list[str]:
    """``qmail-updater status``: the status record as lines for a person."""
    from ..textsafe import printable

    def shown(value: Any) -> str:              # never a terminal escape from the file
        return printable(str(value).encode("utf-8", "surrogateescape"), backslash=False)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st["time"]))
    running = st.get("running")
    lines = [f"daemon:       running ({shown(running)})" if running else
             "daemon:       not running (what follows is from its last run)",
             f"last build:   {when} ({shown(st['result'])}, {st['seconds']}s)",
             f"reason:       {shown(st.get('reason', ''))}",
             f"entries:      {st.get('entries')}",
             f"changes:      +{st.get('added', 0)} -{st.get('removed', 0)}",
             f"builds:       {st.get('builds')} since the daemon started, "
             f"{st.get('incremental_builds', 0)} of them incremental"
             f"{' (the last one too)' if st.get('incremental') else ''}",
             f"pending:      {st.get('pending', 0)} requests" if running else
             "pending:      (none: no daemon)"]
    if running and isinstance(st.get("held_until"), (int, float)):
        lines.append("held until:   " + time.strftime(
            "%H:%M:%S", time.localtime(st["held_until"])) + " (min-interval)")
    if isinstance(st.get("last_success"), (int, float)):
        lines.append("last success: " + time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(st["last_success"])))
    if st.get("last_error"):
        lines.append(f"last error:   {shown(st['last_error'])}")
    held: dict[str, Any] = st["held"] if isinstance(st.get("held"), dict) else {}
    lines.append(f"held:         {len(held)} domain(s)" + (
        ": " + ", ".join(shown(d) for d in sorted(held)[:10]) if held else ""))
    for spec, t in sorted((st.get("publish") or {}).items()):
        if not isinstance(t, dict):
            continue
        state = "up to date" if t.get("up_to_date") else \
            f"behind by {t.get('lag_seconds', 0)}s"
        if isinstance(t.get("last_success"), (int, float)):
            state += ", last success " + time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(t["last_success"]))
        if t.get("last_error") and not t.get("up_to_date"):
            state += f", last error: {shown(t['last_error'])}"
        lines.append(f"publish:      {shown(spec)}: {state}")
    return lines


# --------------------------------------------------------------------------- qmail-updater status

def status_settings(args: Any, settings: Settings) -> tuple[Settings, str]:
    """The settings of the daemon ``status`` reports on, and where they came from:
    flags or this environment when they name it; else ``--service``; else a running
    daemon's own environment; else the usual service directories; else the defaults."""
    from .. import config
    from ..errors import ConfigError
    from ..install.lock import daemon_holder
    from . import locate
    explicit = args.status or args.qmail_dir or any(
        k in os.environ for k in ("UPDATER_STATUS", "QMAIL_DIR", "VALIDRCPTTO_CDB"))
    if explicit and not args.service:
        return settings, "this environment"
    found = list(locate.service_envs(args.service)) if args.service else []
    if not args.service:
        if daemon_holder(settings.cdb + ".daemon"):
            return settings, "the defaults"
        found = [(f"pid {pid}", env) for pid, env in locate.running()]
        found += list(locate.service_envs(None))
    if not found:
        if args.service:
            raise ConfigError("no env directory with settings of ours here", args.service)
        return settings, "the defaults"
    where, env = found[0]
    return config.load(args, {**locate.ours(os.environ), **env}), where


def checks(settings: Settings, st: dict[str, Any] | None, where: str
           ) -> tuple[str | None, list[str], list[str]]:
    """(who runs the daemon, or None; every reason the status record is not the whole
    truth: the daemon down, the live cdb missing, a domain held (from the live list's
    own record, true even when the status file is stale), the status file not rewritten
    while the daemon runs, a full disk; what an admin should know that is no fault:
    catch-all domains)."""
    from ..ident import identity
    from ..install.liverecord import read_record
    from ..install.lock import daemon_holder
    running = daemon_holder((settings.cdb or "") + ".daemon")
    problems: list[str] = []
    problems_info: list[str] = []
    if not running:
        problems.append(f"the daemon is not running (settings from {where})")
    if not os.path.isfile(settings.cdb):
        problems.append(f"{settings.cdb}: the live cdb is missing: every connection gets "
                        "421 until a build writes it")
    record = read_record(settings.cdb)
    if record.catchall:                     # not a fault: said where an admin looks
        more = f" (+{len(record.catchall) - 10} more)" if len(record.catchall) > 10 else ""
        problems_info.append(f"catch-all: every address is accepted at {len(record.catchall)} "
                             f"domain(s): {', '.join(record.catchall[:10])}{more} (vpopmail "
                             "5.6's vadddomain makes one: vdelivermail '' delete)")
    garbage = record.garbage_of(identity(settings.cdb))
    if garbage:                             # not a fault: what `cdbdump` shows beyond lookups
        problems_info.append(f"{settings.cdb}: {garbage} bytes of records removed addresses "
                             "left behind (no lookup finds them; `cdbdump` still lists them, "
                             "`qmail-updater dump` does not); the next full build compacts")
    for domain, held in sorted(record.held.items()):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.since))
        problems.append(f"{held.line(domain)} (since {since})")
    written = st.get("written") if st else None
    if running and isinstance(written, (int, float)) and \
            time.time() - written > 3 * HEARTBEAT:
        problems.append(f"{settings.status}: not rewritten for {time.time() - written:.0f}s "
                        "although the daemon runs: it cannot write there (disk full?)")
    try:                                    # a build writes a new cdb beside the old one
        need = os.stat(settings.cdb).st_size + (64 << 10)
    except OSError:
        need = 64 << 10
    for path in sorted({os.path.dirname(os.path.abspath(p))
                        for p in (settings.cdb, settings.status)}):
        try:
            fs = os.statvfs(path)
        except OSError:
            continue
        if fs.f_bavail * fs.f_frsize < need:
            problems.append(f"{path}: the disk is full ({fs.f_bavail * fs.f_frsize} bytes "
                            f"free, a build needs about {need}): builds fail until there "
                            "is room")
    return running, problems, problems_info
