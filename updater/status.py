"""The daemon's status: the JSON file ``qmail-updater status`` reads, and the
node-exporter textfile, both written atomically (``atomicfile``)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from . import atomicfile
from .errors import UpdaterError


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
                     int(bool(st.get("incremental"))))):
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
    from .textsafe import printable

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
