"""``qmail-updater run``: rebuild validrcptto.cdb when something changes.

Requests come from the trigger FIFO (a reader thread), from file watches (watchdog), from
signals (SIGHUP / SIGALRM: build now) and from the safety-net timer; they go into one
queue.  The main thread debounces them and runs the builds, so a build is never
interrupted: SIGTERM / SIGINT let the build in progress finish, then exit 0.
"""

from __future__ import annotations

import json
import os
import re
import queue
import signal
import threading
import time
from dataclasses import dataclass, field

from .config import Settings
from .errors import UpdaterError
from .fifo import Reader
from .retry import backoff
from .textsafe import printable

STOP = "stop"
MAX_FIFO_LINES = 1000         # lines of one FIFO read looked at (the rest: dropped)
STATUS = "\0status"           # a publish worker's news: rewrite the status file


# --------------------------------------------------------------------------- rules (pure)

@dataclass
class Debouncer:
    """A full build is due once no request came for ``quiet`` seconds, or ``max_delay``
    seconds after the first pending request, whichever is first.  When every pending
    request came through the FIFO (which others may write), the build also waits until
    ``floor`` seconds after the previous build started: a steady stream of triggers
    costs at most one build per ``floor`` seconds, file changes keep their latency.

    A *targeted* request names domains (an onchange ``add_user joe@example.com``, a
    change in one domain's directory): an incremental build redoes just those.  A fast
    one (an addition) is due ``fast_quiet`` after the last fast request, at most
    ``fast_max_delay`` after the first; a slow one (a removal, which vpopmail may report
    before making it, or a watched file's change) waits ``quiet`` / ``max_delay`` like a
    full build.  After a build that applied fast requests, the next targeted build
    waits ``fast_floor`` seconds, or as long as that build took if longer, from its end:
    a burst coalesces into about one build a second, which keeps the daemon busy at most
    half of the time, while a lone addition is applied at once.  A slow request from a
    watched file is settled by any build that starts after it and redoes its domain (a
    later write makes a new event); a pending full build includes every targeted
    request."""
    quiet: float
    max_delay: float
    floor: float = 0.0
    first: float | None = None
    last: float | None = None
    reasons: list[str] = field(default_factory=list)
    now_please: bool = False
    only_fifo: bool = True
    count: int = 0                    # requests since the last build
    fast_quiet: float = 0.05
    fast_max_delay: float = 1.0
    fast_floor: float = 1.0
    fast: set[str] = field(default_factory=set)             # fast requests' domains
    f_first: float | None = None
    f_last: float | None = None
    slow: dict[str, tuple[float, bool]] = field(default_factory=dict)  # -> (when, settles)
    s_first: float | None = None
    t_reasons: list[str] = field(default_factory=list)
    t_count: int = 0

    def add(self, now: float, reason: str, immediate: bool = False, fifo: bool = False) -> None:
        if self.first is None:
            self.first = now
        self.last = now
        self.count += 1
        self.now_please = self.now_please or immediate
        self.only_fifo = self.only_fifo and fifo
        if len(self.reasons) < 20:
            self.reasons.append(reason)

    def target(self, now: float, reason: str, domains: set[str], fast: bool,
               settles: bool = False) -> None:
        """A request that names the domains it changes (``settles``: from a watched
        file, so any build that starts later and redoes the domain answers it)."""
        if fast:
            if self.f_first is None:
                self.f_first = now
            self.f_last = now
            self.fast |= domains
        else:
            if self.s_first is None:
                self.s_first = now
            for d in domains:
                was = self.slow.get(d)
                self.slow[d] = (now, settles and (was is None or was[1]))
        self.count += 1
        self.t_count += 1
        if len(self.t_reasons) < 20:
            self.t_reasons.append(reason)

    @property
    def pending(self) -> bool:
        return self.first is not None or self.f_first is not None or bool(self.slow)

    def due(self, last_build: float | None = None, last_end: float | None = None,
            last_seconds: float = 0.0) -> float | None:
        """The time the pending build is due, or None when nothing is pending
        (``last_build``: when the previous build started; ``last_end``: when the last
        build that applied fast requests ended, ``last_seconds``: how long it took)."""
        full = self.full_due(last_build)
        targeted = self.targeted_due(last_end, last_seconds)
        if full is None or targeted is None:
            return full if targeted is None else targeted
        return min(full, targeted)

    def full_due(self, last_build: float | None = None) -> float | None:
        if self.first is None or self.last is None:
            return None
        if self.now_please:
            return self.first
        due = min(self.last + self.quiet, self.first + self.max_delay)
        if self.only_fifo and last_build is not None:
            due = max(due, last_build + self.floor)
        return due

    def _fast_due(self) -> float | None:
        if self.f_first is None or self.f_last is None:
            return None
        return min(self.f_last + self.fast_quiet, self.f_first + self.fast_max_delay)

    def _slow_due(self) -> float | None:
        if not self.slow or self.s_first is None:
            return None
        return min(max(t for t, _ in self.slow.values()) + self.quiet,
                   self.s_first + self.max_delay)

    def targeted_due(self, last_end: float | None = None,
                     last_seconds: float = 0.0) -> float | None:
        dues = [d for d in (self._fast_due(), self._slow_due()) if d is not None]
        if not dues:
            return None
        due = min(dues)
        if last_end is not None:
            due = max(due, last_end + max(self.fast_floor, last_seconds))
        return due

    def held(self, last_build: float | None = None) -> float | None:
        """When the floor, not the quiet period, is what the pending full build waits
        for: the time it is held until; else None."""
        if self.first is None or self.last is None or self.now_please or \
                not self.only_fifo or last_build is None:
            return None
        quiet = min(self.last + self.quiet, self.first + self.max_delay)
        floor = last_build + self.floor
        return floor if floor > quiet else None

    def take(self) -> list[str]:
        """Everything pending, for a full build."""
        reasons = self.reasons + self.t_reasons
        self.first = self.last = None
        self.reasons, self.now_please, self.only_fifo = [], False, True
        self.take_targeted()
        self.count = 0
        return reasons

    def take_targeted(self, now: float | None = None) -> tuple[list[str], set[str]]:
        """The targeted requests that are due at ``now`` (all of them when None); a
        full build stays pending."""
        domains: set[str] = set()
        fast_due, slow_due = self._fast_due(), self._slow_due()
        if fast_due is not None and (now is None or fast_due <= now):
            domains |= self.fast
            self.fast, self.f_first, self.f_last = set(), None, None
        if slow_due is not None and (now is None or slow_due <= now):
            domains |= set(self.slow)
            self.slow, self.s_first = {}, None
        reasons = self.t_reasons
        if not self.fast and not self.slow:
            self.count -= self.t_count
            self.t_reasons, self.t_count = [], 0
        else:
            self.t_reasons = []
        return reasons, domains

    def fast_due_by(self, now: float) -> bool:
        """Whether fast requests are due at ``now``."""
        due = self._fast_due()
        return due is not None and due <= now

    def settling(self, now: float) -> set[str] | None:
        """When what is due now is only watched-file requests (each answered by the
        previous build if the files are still what it read), their domains; else None."""
        fast_due, slow_due = self._fast_due(), self._slow_due()
        if slow_due is None or slow_due > now or (fast_due is not None and fast_due <= now):
            return None
        if not all(settles for _, settles in self.slow.values()):
            return None
        return set(self.slow)

    def settle(self, started: float, redone: set[str]) -> None:
        """A build that started at ``started`` redid ``redone``: the watched-file
        requests for those domains made before it are answered."""
        for d in redone & self.slow.keys():
            when, settles = self.slow[d]
            if settles and when < started:
                del self.slow[d]
                self.count -= 1
                self.t_count -= 1
        if not self.slow:
            self.s_first = None
        self.count = max(self.count, 0)
        self.t_count = max(self.t_count, 0)


# onchange commands that name one address (vpopmail: "%s@%s"; qmailadmin's mailing
# lists too), the ones that name a domain whose keys they change; the additions are
# applied at once, anything else after the quiet period (del_user and valias_delete
# are reported before the change is made)
ADDITIONS = re.compile(r"(add|mod)(_.*)?|.*_(insert|add)|add.*")
DOMAIN_COMMANDS = {"valias_delete_domain"}
MAX_DOMAIN = 253
_DOMAIN = re.compile(r"[a-z0-9._-]+")


def onchange_target(line: str) -> tuple[str, bool] | None:
    """(domain, fast) for an onchange request that names the one domain it changes,
    else None (pure).  ``fast``: an addition, applied without the quiet period."""
    words = line.split()
    if words and words[-1] == "after":
        words = words[:-1]
    if len(words) != 2:
        return None
    command, arg = words
    if command in DOMAIN_COMMANDS:
        domain = arg
    elif "@" in arg and command.replace("_", "").isalpha():
        domain = arg.rpartition("@")[2]
    else:
        return None
    domain = domain.translate(_LOWER)
    if not domain or len(domain) > MAX_DOMAIN or not _DOMAIN.fullmatch(domain):
        return None
    fast = command not in DOMAIN_COMMANDS and ADDITIONS.fullmatch(command) is not None
    return domain, fast


_LOWER = {c: c + 32 for c in range(65, 91)}


def interesting(path: str, targets: dict[str, tuple[set[str], tuple[str, ...]]],
                ignore: set[str]) -> bool:
    """Whether a changed path is one the list depends on (and not one we write)."""
    if not path:
        return False
    path = os.path.abspath(path)
    if path in ignore:
        return False
    directory, name = os.path.split(path)
    if name.startswith("."):
        for own in ignore:                    # our temp files: .validrcptto.cdb.tmp.<random>
            if name.startswith("." + os.path.basename(own) + ".tmp."):
                return False
    target = targets.get(directory)
    if target is None:
        return False
    names, prefixes = target
    return name in names or any(name.startswith(p) for p in prefixes)


# --------------------------------------------------------------------------- the daemon

class Daemon:
    def __init__(self, settings: Settings, log):
        self.s = settings
        self.log = log
        # SimpleQueue.put is reentrant: the signal handlers may call it at any moment
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.debounce = Debouncer(settings.quiet, settings.max_delay, settings.min_interval,
                                  fast_quiet=settings.target_quiet,
                                  fast_max_delay=max(settings.target_interval,
                                                     settings.target_quiet),
                                  fast_floor=settings.target_interval)
        self.snapshot = None                 # what an incremental build starts from
        self.last_end: float | None = None   # when the last build with fast requests ended
        self.last_seconds = 0.0              # and how long it took
        self.incremental_builds = 0
        self.stop_event = threading.Event()
        self.build_started: float | None = None
        self.stopping = False
        self.failures = 0
        self.retry_at: float | None = None
        self.last_build = 0.0
        self.builds = 0
        self.status: dict = {}
        self.status_written = 0.0
        self.status_due: float | None = None        # pending counts not written yet
        self.observer = None
        self.polling = settings.poll > 0
        self.targets: dict = {}
        self.publisher = None
        if settings.publish:
            from .publish import Publisher, parse_targets
            self.publisher = Publisher(settings, settings.cdb, log,
                                       lambda: self.requests.put((STATUS, False, False, None)),
                                       parse_targets(settings.publish))
        self.ignore = {os.path.abspath(p) for p in (
            settings.cdb, settings.cdb + ".lock", settings.cdb + ".daemon", settings.status,
            settings.fifo,
            settings.prom_file) if p}

    # ---- requests
    def request(self, reason: str, immediate: bool = False, fifo: bool = False,
                extra: tuple | None = None) -> None:
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
            text = printable(line[:200])
            target = onchange_target(line[:300].decode("ascii", "replace")) \
                if self.s.incremental else None
            if target is not None:
                self.request("fifo: " + text, fifo=True, extra=("domains", {target[0]},
                                                                 target[1]))
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

    # ---- watches
    def watch(self) -> None:
        """(Re)start the file watches on the directories the list depends on."""
        from .generate import watch_targets
        targets = {d: t for d, t in watch_targets(self.s).items() if os.path.isdir(d)}
        if targets == self.targets and self.observer is not None and self.observer.is_alive():
            return
        self.targets = targets
        self.stop_watching()
        from watchdog.events import (FileClosedEvent, FileCreatedEvent, FileDeletedEvent,
                                     FileModifiedEvent, FileMovedEvent, FileSystemEventHandler)
        daemon = self
        # Only changes: no inotify events for the thousands of files a build merely reads.
        changes = [FileCreatedEvent, FileModifiedEvent, FileDeletedEvent, FileMovedEvent,
                   FileClosedEvent]

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.event_type in ("opened", "closed_no_write") or event.is_directory:
                    return
                for path in (event.src_path, getattr(event, "dest_path", "")):
                    if isinstance(path, bytes):
                        path = os.fsdecode(path)
                    if interesting(path, daemon.targets, daemon.ignore):
                        daemon.request(f"{event.event_type} {path}", extra=("path", path))
                        return

        while True:
            observer = None
            try:
                if self.polling:
                    from watchdog.observers.polling import PollingObserver
                    observer = PollingObserver(timeout=self.s.poll or 5.0)
                else:
                    from watchdog.observers import Observer
                    observer = Observer()       # EMFILE here: no inotify instance left
                for directory in sorted(targets):
                    try:
                        observer.schedule(Handler(), directory, recursive=False,
                                          event_filter=changes)
                    except TypeError:           # a watchdog older than 4.0: every event
                        observer.schedule(Handler(), directory, recursive=False)
                observer.start()
            except OSError as err:
                try:
                    if observer is not None:
                        observer.stop()
                except Exception:
                    pass
                if self.polling:
                    self.log(f"cannot watch files ({err}); relying on triggers and the "
                             "safety net")
                    return
                self.log(f"inotify refused ({err}); falling back to polling")
                self.polling = True
                continue
            self.observer = observer
            self.log(f"watching {len(targets)} directories"
                     f"{' by polling' if self.polling else ''}")
            return

    def stop_watching(self) -> None:
        if self.observer is not None:
            try:
                self.observer.stop()
                self.observer.join(5)
            except Exception:
                pass
            self.observer = None

    # ---- builds
    def targets_of(self, extra: tuple | None) -> tuple[set[str], bool, bool]:
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

    def run_build(self, domains: set[str] | None, lines: list[str]):
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
            return install_result(result, self.s.cdb, self.s, self.s.force,
                                  stop=self.stop_event), None
        self.snapshot = None            # never two lists in memory at once
        report, snap, warnings = incremental.full(self.s, self.stop_event, self.s.force)
        lines[:0] = [f"warning: {w}" for w in warnings]
        self.snapshot = snap
        return report, None

    def build(self, reasons: list[str], domains: set[str] | None = None,
              fast: bool = False) -> None:
        started = time.time()
        self.build_started = time.monotonic()
        self.builds += 1
        why = "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")
        record = {"time": started, "reason": why, "builds": self.builds}
        lines: list[str] = []                   # logged once the status file is written
        redone = None
        try:
            report, redone = self.run_build(domains, lines)
        except Exception as err:            # a source error, or a bug: the daemon keeps running
            if not isinstance(err, UpdaterError):
                err = f"internal error: {type(err).__name__}: {err}"
            self.failures += 1
            delay = backoff(self.failures, self.s.retry_min, self.s.retry_max)
            self.retry_at = time.monotonic() + delay
            lines.append(f"build failed ({why}): {err}; live cdb kept; retry in {delay:g}s")
            record.update(result="failed", error=str(err), entries=self.status.get("entries"),
                          added=0, removed=0, failures=self.failures)
        else:
            self.failures = 0
            self.retry_at = None
            scope = ""
            if redone is not None:
                self.incremental_builds += 1
                names = ", ".join(sorted(redone)[:3]) + (", ..." if len(redone) > 3 else "")
                scope = f" [incremental: {len(redone)} domain{'s' if len(redone) != 1 else ''}" \
                    f"{': ' + names if names else ''}]"
            lines.append(f"build ({why}): {report.line()}{scope}")
            changes = report.changes_line()
            if changes:
                lines.append(changes)
            record.update(result=report.status, entries=report.entries, added=len(report.added),
                          removed=len(report.removed), error=None, failures=0,
                          last_success=started)
            # every install goes out; so does the first list (a receiver may be stale)
            if self.publisher is not None and (report.status == "installed" or
                                               self.builds == 1):
                self.publisher.installed()
        record["seconds"] = round(time.time() - started, 3)
        record["incremental"] = redone is not None
        if redone is not None and record["result"] != "failed":
            record["phases"] = {k: round(v, 4) for k, v in report.phases.items()}
        record["incremental_builds"] = self.incremental_builds
        record["pending"] = self.debounce.count + self.requests.qsize()
        record["held_until"] = None
        if "last_success" not in record and "last_success" in self.status:
            record["last_success"] = self.status["last_success"]
        if record["result"] == "failed" and record["error"]:
            record["last_error"] = record["error"]
        self.status = record
        ended = time.monotonic()
        if fast:                                 # the floor between additions' builds
            self.last_end, self.last_seconds = ended, ended - self.build_started
        if redone is None:
            self.last_build = ended              # the safety net counts from full builds
        else:
            self.debounce.settle(self.build_started, redone)
        try:
            self.write_status()
        except OSError as err:
            lines.append(f"cannot write the status file: {err}")
        for line in lines:
            self.log(line)
        if redone is None:        # an incremental build changes no directory to watch
            self.watch()

    def write_status(self) -> None:
        self.status_written = time.monotonic()
        self.status_due = None
        if self.publisher is not None:
            self.status["publish"] = self.publisher.report()
        write_atomic(self.s.status, json.dumps(self.status, indent=1, sort_keys=True) + "\n")
        if self.s.prom_file:
            write_atomic(self.s.prom_file, prometheus_text(self.status))

    def show_pending(self, now: float, reason: str) -> None:
        """Requests waiting for a build are visible: the status file counts them (at most
        one write a second), and a build held back by the min-interval floor is logged
        once with the time it is held until, and shown by ``status``."""
        if not self.status:
            return
        held = self.debounce.held(self.build_started)
        until = None if held is None else round(time.time() + held - now, 3)
        if until is not None and self.status.get("held_until") is None:
            clock = time.strftime("%H:%M:%S", time.localtime(until))
            self.log(f"held until {clock} (min-interval {self.s.min_interval:g}s): {reason}")
        changed = (until is None) != (self.status.get("held_until") is None)
        self.status["pending"] = self.debounce.count
        self.status["held_until"] = until
        self.status_due = now if changed else max(now, self.status_written + 1.0)
        self.flush_status(now)

    def flush_status(self, now: float) -> None:
        if self.status_due is not None and self.status_due <= now:
            self.status_due = None
            try:
                self.write_status()
            except OSError as err:
                self.log(f"cannot write the status file: {err}")

    # ---- main loop
    def run(self) -> int:
        from .install import take_lock
        try:                        # one daemon per tree: the second exits at once
            self.instance = take_lock(self.s.cdb + ".daemon", 0, what="qmail-updater run")
        except UpdaterError as err:
            raise UpdaterError(f"{err}: exiting") from None
        reader = Reader(self.s.fifo, self.s.fifo_mode, self.log, group=self.s.fifo_group)

        def stop(n, f) -> None:
            self.stop_event.set()
            self.requests.put((STOP, True, False, None))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
        for sig in (signal.SIGHUP, signal.SIGALRM):
            signal.signal(sig, lambda n, f: self.request(f"signal {signal.Signals(n).name}",
                                                         immediate=True))
        threading.Thread(target=self.fifo_thread, args=(reader,), daemon=True).start()
        self.log(f"started: cdb {self.s.cdb}, trigger {self.s.fifo}, quiet {self.s.quiet:g}s, "
                 f"max delay {self.s.max_delay:g}s, safety net {self.s.interval:g}s")
        self.watch()                     # before the first build: no change slips between
        self.build(["start"])
        while not self.stopping:
            now = time.monotonic()
            deadlines = [d for d in (self.debounce.due(self.build_started, self.last_end,
                                                       self.last_seconds), self.retry_at,
                                     self.status_due) if d is not None]
            if self.s.interval > 0:
                deadlines.append(self.last_build + self.s.interval)
            timeout = max(0.0, min(deadlines) - now) if deadlines else 60.0
            try:
                reason, immediate, fifo, extra = self.requests.get(timeout=min(timeout, 60.0))
            except queue.Empty:
                reason = None
            if reason == STOP:
                self.stopping = True
                break
            if reason == STATUS:
                if self.status:
                    try:
                        self.write_status()
                    except OSError as err:
                        self.log(f"cannot write the status file: {err}")
                continue
            now = time.monotonic()
            if reason is not None:
                domains, fast, settles = self.targets_of(extra)
                if domains:
                    self.debounce.target(now, reason, domains, fast, settles)
                else:
                    self.debounce.add(now, reason, immediate, fifo)
                self.show_pending(now, reason)
                continue
            self.flush_status(now)
            if self.observer is not None and not self.observer.is_alive():
                self.log("the file watcher died; restarting it by polling")
                self.polling = True
                self.observer = None
                self.watch()
            full = self.debounce.full_due(self.build_started)
            targeted = self.debounce.targeted_due(self.last_end, self.last_seconds)
            if full is not None and full <= now:
                self.build(self.debounce.take())
            elif targeted is not None and targeted <= now:
                quiet = self.debounce.settling(now)
                snap = self.snapshot
                if quiet is not None and snap is not None and \
                        not quiet & snap.inputs.changed():
                    self.debounce.settle(now, quiet)   # the files are what the list says
                    continue
                fast = self.debounce.fast_due_by(now)
                self.build(*self.debounce.take_targeted(now), fast=fast)
            elif self.retry_at is not None and self.retry_at <= now:
                self.build([f"retry {self.failures}"])
            elif self.s.interval > 0 and self.last_build + self.s.interval <= now:
                self.build(["safety net"])
        self.stop_watching()
        if self.publisher is not None:
            self.publisher.stop()
        reader.close()
        os.close(self.instance)
        self.log("stopped")
        return 0


def prometheus_text(st: dict) -> str:
    """The node-exporter textfile for a status record, in prometheus-client's format
    (written by ``write_atomic``, not ``write_to_textfile``, whose temporary file has a
    predictable name a local user could plant a symlink at)."""
    from prometheus_client import generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import CollectorRegistry

    class Status:
        def collect(self):
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


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    """Write a file others may read, in a directory others may write: a new file with
    an unpredictable name (mkstemp: O_CREAT|O_EXCL, so a planted symlink is never
    followed), its mode set on the descriptor, fsynced, renamed over ``path``."""
    import tempfile
    directory, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


STATUS_KEYS = ("time", "result", "seconds")


def read_status(path: str) -> dict | None:
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
