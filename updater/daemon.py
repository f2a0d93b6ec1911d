"""``qmail-updater run``: rebuild validrcptto.cdb when something changes.

Requests come from the trigger FIFO (a reader thread), from file watches (``watch``),
from signals (SIGHUP / SIGALRM: build now) and from the safety-net timer; they go into
one queue.  The main thread debounces them (``debounce``) and runs the builds, full or
incremental (``incremental``), so a build is never interrupted: SIGTERM / SIGINT let
the build in progress finish, then exit 0.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from . import status as status_file
from .config import Settings
from .debounce import Debouncer, onchange_target
from .errors import UpdaterError
from .fifo import Reader
from .inputs import Ident, identity
from .install import Report, sources_path
from .retry import backoff
from .textsafe import printable
from .watch import Watcher

STOP = "stop"
LIVE_CHECK = 0.25             # seconds between looks at the live cdb and its .sources file
MAX_FIFO_LINES = 1000         # lines of one FIFO read looked at (the rest: dropped)
STATUS = "\0status"           # a publish worker's news: rewrite the status file
Request = tuple[str, bool, bool, Any]     # reason, immediate, fifo, extra


class Daemon:
    def __init__(self, settings: Settings, log: Callable[[str], None]):
        self.s = settings
        self.log = log
        # SimpleQueue.put is reentrant: the signal handlers may call it at any moment
        self.requests: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self.debounce = Debouncer(settings.quiet, settings.max_delay, settings.min_interval,
                                  fast_quiet=settings.target_quiet,
                                  fast_max_delay=max(settings.target_interval,
                                                     settings.target_quiet),
                                  fast_floor=settings.target_interval)
        self.snapshot: Any = None            # what an incremental build starts from
        self.last_end: float | None = None   # when the last incremental build ended
        self.last_seconds = 0.0              # and how long it took
        self.incremental_builds = 0
        self.stop_event = threading.Event()
        self.build_started: float | None = None
        self.stopping = False
        self.failures = 0
        self.retry_at: float | None = None
        self.last_build = 0.0
        self.builds = 0
        self.status: dict[str, Any] = {}
        self.status_written = 0.0
        self.status_due: float | None = None        # pending counts not written yet
        self.publisher: Any = None
        cdb = settings.cdb or ""
        # what the last build left as the live cdb and its .sources file: anything else
        # there later (an admin's rm, a file copied over it) is put right by a full build
        self.live: tuple[Ident | None, Ident | None] | None = None
        self.live_check = 0.0
        if settings.publish:
            from .publish import Publisher, parse_targets
            self.publisher = Publisher(settings, cdb, log,
                                       lambda: self.requests.put((STATUS, False, False, None)),
                                       parse_targets(settings.publish))
        ignore = {os.path.abspath(p) for p in (
            cdb, cdb + ".lock", cdb + ".daemon", settings.status, settings.fifo,
            settings.prom_file) if p}
        self.watcher = Watcher(settings, log, lambda kind, path: self.request(
            f"{kind} {path}", extra=("path", path)), ignore)

    # ---- requests
    def request(self, reason: str, immediate: bool = False, fifo: bool = False,
                extra: Any = None) -> None:
        """Queue a request; ``extra``: ("domains", {domain}, fast) for one that names
        what it changes, ("path", path) for a watched file's change."""
        self.requests.put((reason, immediate, fifo, extra))

    def fifo_requests(self, data: bytes) -> None:
        """One read of the FIFO: an onchange line naming its domain is a targeted
        request; the other lines make one request for a full build, as before."""
        others = []
        for raw in data.split(b"\n")[:MAX_FIFO_LINES]:
            line = raw.strip()
            if not line:
                continue
            target = onchange_target(line[:300].decode("ascii", "replace")) \
                if self.s.incremental else None
            if target is not None:
                self.request("fifo: " + printable(line[:200]), fifo=True,
                             extra=("domains", set(target[0]), target[1]))
            else:
                others.append(line)
        if others or not data.strip():
            text = printable(b"; ".join(others)[:200])
            self.request("fifo: " + (text or "(empty)"), fifo=True)

    def fifo_thread(self, reader: Reader) -> None:
        import select
        while not self.stopping:
            if reader.fd < 0:                   # reported by the reader; retried there
                time.sleep(1.0)
                reader.check()
                continue
            try:
                ready, _, _ = select.select([reader.fd], [], [], 1.0)
                if ready:
                    data = reader.read()
                    if data:
                        self.fifo_requests(data)
                reader.check()
            except (OSError, ValueError) as err:
                self.log(f"trigger FIFO error: {err}; reopening")
                time.sleep(1)
                reader.open()

    def targets_of(self, extra: Any) -> tuple[set[str], bool, bool]:
        """The domains a request changes (none: a full build), whether it is fast, and
        whether it comes from a watched file."""
        if not self.s.incremental or extra is None:
            return set(), False, False
        if extra[0] == "domains":
            return set(extra[1]), bool(extra[2]), False
        snap = self.snapshot
        if extra[0] == "path" and snap is not None:
            path = os.path.abspath(extra[1])
            if path not in snap.globals:
                return snap.inputs.domains_of(path), False, True
        return set(), False, False

    # ---- builds
    def run_build(self, domains: set[str] | None,
                  lines: list[str]) -> tuple[Report, set[str] | None]:
        """The build itself: incremental when ``domains`` is given and there is a
        snapshot to start from, else full.  Returns (report, domains redone or None)."""
        from . import incremental
        from .install import LiveChanged
        if domains is not None and self.snapshot is not None:
            try:
                report, snap, warnings, redone = incremental.build(
                    self.s, self.snapshot, domains, self.stop_event, self.s.force)
            except (incremental.NeedFull, LiveChanged) as why:
                lines.append(f"incremental build not possible ({why}): full build")
            else:
                lines[:0] = [f"warning: {w}" for w in warnings]
                self.snapshot = snap
                return report, redone
        if not self.s.incremental:
            from .generate import generate
            from .install import install_result
            result = generate(self.s)
            lines[:0] = [f"warning: {w}" for w in result.warnings]
            return install_result(result, self.s.cdb or "", self.s, self.s.force,
                                  stop=self.stop_event), None
        self.snapshot = None            # never two lists in memory at once
        report, snap, warnings = incremental.full(self.s, self.stop_event, self.s.force)
        lines[:0] = [f"warning: {w}" for w in warnings]
        self.snapshot = snap
        return report, None

    def build(self, reasons: list[str], domains: set[str] | None = None) -> None:
        started = time.time()
        self.build_started = time.monotonic()
        self.builds += 1
        why = "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")
        record: dict[str, Any] = {"time": started, "reason": why, "builds": self.builds}
        lines: list[str] = []                   # logged once the status file is written
        redone = None
        try:
            report, redone = self.run_build(domains, lines)
        except Exception as err:            # a source error, or a bug: the daemon keeps running
            self.failed(err, why, record, lines)
        else:
            self.succeeded(report, redone, why, record, lines)
        record["seconds"] = round(time.time() - started, 3)
        record["incremental"] = redone is not None
        record["incremental_builds"] = self.incremental_builds
        if "last_success" not in record and "last_success" in self.status:
            record["last_success"] = self.status["last_success"]
        if record["result"] == "failed" and record["error"]:
            record["last_error"] = record["error"]
        self.status = record
        ended = time.monotonic()
        if redone is not None:                   # the floor between incremental builds
            self.last_end, self.last_seconds = ended, ended - self.build_started
        if redone is None:
            self.last_build = ended              # the safety net counts from full builds
        else:
            self.debounce.settle(self.build_started, redone)
        record["pending"], record["held_until"] = self.waiting(ended)
        try:
            self.write_status()
        except OSError as err:
            lines.append(f"cannot write the status file: {err}")
        for line in lines:
            self.log(line)
        self.live = self.live_files()
        if redone is None:        # an incremental build changes no directory to watch
            self.watcher.start()

    def failed(self, err: Exception, why: str, record: dict[str, Any],
               lines: list[str]) -> None:
        text = str(err) if isinstance(err, UpdaterError) else \
            f"internal error: {type(err).__name__}: {err}"
        self.failures += 1
        delay = backoff(self.failures, self.s.retry_min, self.s.retry_max)
        self.retry_at = time.monotonic() + delay
        lines.append(f"build failed ({why}): {text}; live cdb kept; retry in {delay:g}s")
        record.update(result="failed", error=text, entries=self.status.get("entries"),
                      added=0, removed=0, failures=self.failures)

    def succeeded(self, report: Report, redone: set[str] | None, why: str,
                  record: dict[str, Any], lines: list[str]) -> None:
        self.failures = 0
        self.retry_at = None
        scope = ""
        if redone is not None:
            self.incremental_builds += 1
            names = ", ".join(sorted(redone)[:3]) + (", ..." if len(redone) > 3 else "")
            scope = f" [incremental: {len(redone)} domain{'s' if len(redone) != 1 else ''}" \
                f"{': ' + names if names else ''}]"
            record["phases"] = {k: round(v, 4) for k, v in report.phases.items()}
        lines.append(f"build ({why}): {report.line()}{scope}")
        changes = report.changes_line()
        if changes:
            lines.append(changes)
        record.update(result=report.status, entries=report.entries, added=len(report.added),
                      removed=len(report.removed), error=None, failures=0,
                      last_success=record["time"])
        # every install goes out; so does the first list (a receiver may be stale)
        if self.publisher is not None and (report.status == "installed" or self.builds == 1):
            self.publisher.installed()

    # ---- the live files
    def live_files(self) -> tuple[Ident | None, Ident | None]:
        cdb = self.s.cdb or ""
        return identity(cdb), identity(sources_path(cdb))

    def check_live(self, now: float) -> None:
        """The live cdb (or its .sources file) is no longer what the last build left
        there: deleted or replaced by hand.  A full build, at once, says why."""
        self.live_check = now + LIVE_CHECK
        if self.live is None:
            return
        seen = self.live_files()
        if seen == self.live:
            return
        what = ("the live cdb", "its .sources file")[seen[0] == self.live[0]]
        how = "deleted" if seen[seen[0] == self.live[0]] is None else "replaced"
        self.live = seen                         # asked once; a failed build retries
        self.request(f"{what} was {how}", immediate=True)

    # ---- the status file
    def write_status(self) -> None:
        self.status_written = time.monotonic()
        self.status_due = None
        if self.publisher is not None:
            self.status["publish"] = self.publisher.report()
        status_file.write(self.s.status or "", self.status, self.s.prom_file)

    def show_pending(self, now: float, reason: str) -> None:
        """Requests waiting for a build are visible: the status file counts them (at most
        one write a second), and a build held back by the min-interval floor is logged
        once with the time it is held until, and shown by ``status``."""
        if not self.status:
            return
        pending, until = self.waiting(now)
        if until is not None and self.status.get("held_until") is None:
            clock = time.strftime("%H:%M:%S", time.localtime(until))
            self.log(f"held until {clock} (min-interval {self.s.min_interval:g}s): {reason}")
        changed = (until is None) != (self.status.get("held_until") is None)
        self.status["pending"] = pending
        self.status["held_until"] = until
        self.status_due = now if changed else max(now, self.status_written + 1.0)
        self.flush_status(now)

    def waiting(self, now: float) -> tuple[int, float | None]:
        """(requests pending, the wall-clock time a full build is held until by the
        min-interval floor, or None): true after every build, not only on a request."""
        held = self.debounce.held(self.build_started)
        until = None if held is None else round(time.time() + held - now, 3)
        return self.debounce.waiting, until

    def flush_status(self, now: float) -> None:
        if self.status_due is not None and self.status_due <= now:
            self.rewrite_status()

    # ---- main loop
    def run(self) -> int:
        from .lock import take_lock
        cdb = self.s.cdb or ""
        try:                        # one daemon per tree: the second exits at once
            instance = take_lock(cdb + ".daemon", 0, what="qmail-updater run")
        except UpdaterError as err:
            raise UpdaterError(f"{err}: exiting") from None
        reader = Reader(self.s.fifo, self.s.fifo_mode, self.log, group=self.s.fifo_group)

        def stop(n: int, f: Any) -> None:
            self.stop_event.set()
            self.requests.put((STOP, True, False, None))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
        for sig in (signal.SIGHUP, signal.SIGALRM):
            signal.signal(sig, lambda n, f: self.request(f"signal {signal.Signals(n).name}",
                                                         immediate=True))
        threading.Thread(target=self.fifo_thread, args=(reader,), daemon=True).start()
        self.log(f"started: cdb {cdb}, trigger {self.s.fifo}, quiet {self.s.quiet:g}s, "
                 f"max delay {self.s.max_delay:g}s, safety net {self.s.interval:g}s")
        self.watcher.start()             # before the first build: no change slips between
        self.build(["start"])
        while not self.stopping:
            self.step()
        self.watcher.stop()
        if self.publisher is not None:
            self.publisher.stop()
        reader.close()
        os.close(instance)
        self.log("stopped")
        return 0

    def next_request(self) -> Request | None:
        """The next request, or None when a deadline comes first."""
        now = time.monotonic()
        deadlines = [d for d in (self.debounce.due(self.build_started, self.last_end,
                                                   self.last_seconds), self.retry_at,
                                 self.status_due, self.live_check) if d is not None]
        if self.s.interval > 0:
            deadlines.append(self.last_build + self.s.interval)
        timeout = max(0.0, min(deadlines) - now) if deadlines else 60.0
        try:
            return self.requests.get(timeout=min(timeout, 60.0))
        except queue.Empty:
            return None

    def step(self) -> None:
        """Take one request, or run what is due."""
        got = self.next_request()
        now = time.monotonic()
        if got is not None:
            reason, immediate, fifo, extra = got
            if reason == STOP:
                self.stopping = True
            elif reason == STATUS:
                if self.status:
                    self.rewrite_status()
            else:
                domains, fast, settles = self.targets_of(extra)
                if domains:
                    self.debounce.target(now, reason, domains, fast, settles)
                else:
                    self.debounce.add(now, reason, immediate, fifo)
                self.show_pending(now, reason)
            return
        self.flush_status(now)
        if self.live_check <= now:
            self.check_live(now)
        self.watcher.check()
        full = self.debounce.full_due(self.build_started)
        targeted = self.debounce.targeted_due(self.last_end, self.last_seconds)
        if full is not None and full <= now:
            self.build(self.debounce.take())
        elif targeted is not None and targeted <= now:
            quiet = self.debounce.settling(now)
            snap = self.snapshot
            if quiet is not None and snap is not None and not quiet & snap.inputs.changed():
                self.debounce.settle(now, quiet)   # the files are what the list says
                self.show_pending(now, "")
                return
            self.build(*self.debounce.take_targeted(now))
        elif self.retry_at is not None and self.retry_at <= now:
            self.build([f"retry {self.failures}"])
        elif self.s.interval > 0 and self.last_build + self.s.interval <= now:
            self.build(["safety net"])

    def rewrite_status(self) -> None:
        try:
            self.write_status()
        except OSError as err:
            self.log(f"cannot write the status file: {err}")
