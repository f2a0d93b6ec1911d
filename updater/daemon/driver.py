"""``qmail-updater run``: rebuild validrcptto.cdb when something changes.

Events come from the trigger FIFO (a reader thread), from file watches (``watch``),
from signals (SIGHUP / SIGALRM: build now), from directory polls and from the publish
workers; those threads and handlers only put them on one queue (``events``).  The main
thread hands each to the pure ``rules.Scheduler`` (every timing rule and decision) and
carries out the actions it returns, one line each, running the builds, full or
incremental (``memory``), itself: a build is never interrupted, SIGTERM / SIGINT let the
build in progress finish, then exit 0.
"""

from __future__ import annotations

import os
import queue
import select
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from ..config import Settings
from ..errors import UpdaterError
from ..install.lock import take_lock
from ..limits import DAEMON_IDLE
from ..publish import Publisher
from ..targets import parse_targets
from . import status as status_file
from .directorypoll import Ask, poll
from .events import (
    Action,
    Build,
    BuildDone,
    CheckFiles,
    CheckLive,
    DirectoryPolled,
    Event,
    Exit,
    FifoRead,
    FileChanged,
    FilesChecked,
    HeldUntil,
    LiveSeen,
    Log,
    PollDirectory,
    Publish,
    Requested,
    Rewatch,
    Rewatched,
    StatusNews,
    StatusRecord,
    StatusWritten,
    Stop,
    Tick,
    Timing,
    WriteStatus,
)
from .fifo import Reader
from .memory import Memory, live_files
from .rules import Scheduler
from .watch import Watcher


class Daemon:
    """The driver: threads (the FIFO reader, the file watcher, the directory polls, the
    publish workers) and signal handlers put typed events on one queue; the main thread
    hands each to the ``Scheduler`` and carries out the actions it returns."""

    def __init__(self, settings: Settings, log: Callable[[str], None]):
        self.s = settings
        self.log = log
        # SimpleQueue.put is reentrant: the signal handlers may call it at any moment
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.scheduler = Scheduler(Timing.of(settings))
        self.memory = Memory(settings)
        self.stop_event = threading.Event()     # set by SIGTERM: builds and threads end
        self.running = True                     # until the rules say Exit
        self.publisher: Publisher | None = None
        cdb = settings.cdb or ""
        if settings.publish:
            self.publisher = Publisher(settings, cdb, log,
                                       lambda: self.events.put(StatusNews()),
                                       parse_targets(settings.publish))
        ignore = {os.path.abspath(p) for p in (
            cdb, cdb + ".lock", cdb + ".daemon", settings.status, settings.fifo,
            settings.prom_file) if p}
        self.watcher = Watcher(settings, log, lambda kind, path: self.events.put(
            FileChanged(f"{kind} {path}", path)), ignore)

    # ---- the threads: each only puts events
    def fifo_thread(self, reader: Reader) -> None:
        while not self.stop_event.is_set():
            if reader.fd < 0:                   # reported by the reader; retried there
                time.sleep(1.0)
                reader.check()
                continue
            try:
                ready, _, _ = select.select([reader.fd], [], [], 1.0)
                if ready:
                    data, dropped = reader.read()
                    if data or dropped:
                        self.events.put(FifoRead(data, dropped))
                reader.check()
            except (OSError, ValueError) as err:
                self.log(f"trigger FIFO error: {err}; reopening")
                time.sleep(1)
                reader.open()

    def poll_directory(self, q: Ask) -> None:
        """(A thread of its own: a slow directory never holds a build back; what it asks
        was taken in this one.)"""
        self.events.put(poll(self.s, q))

    # ---- carrying out the actions
    def feed(self, event: Event) -> None:
        """Hand one event to the rules and carry out what they say, answering the
        actions that need an answer (a build, a look at the files) with their events."""
        todo = [event]
        while todo and self.running:
            for action in self.scheduler.handle(todo.pop(0), time.monotonic(), time.time()):
                answer = self.act(action)
                if answer is not None:
                    todo.append(answer)

    def act(self, action: Action) -> Event | None:
        match action:
            case Build():
                return BuildDone(self.memory.build(action, self.stop_event))
            case CheckFiles(domains):
                return FilesChecked(domains, self.memory.files_changed(domains))
            case PollDirectory(full):
                return self.start_poll(full)
            case CheckLive():
                self.watcher.check()
                return LiveSeen(live_files(self.s.cdb or ""))
            case WriteStatus(record):
                return self.write_status(record)
            case Log(line):
                self.log(line)
            case HeldUntil(until, floor, reason):
                self.log(f"held until {time.strftime('%H:%M:%S', time.localtime(until))} "
                         f"(min-interval {floor:g}s): {reason}")
            case Publish():
                if self.publisher is not None:
                    self.publisher.installed()
            case Rewatch(fresh):
                self.watcher.start(self.memory.record)
                return Rewatched(self.memory.moved() if fresh else frozenset())
            case Exit():
                self.running = False
        return None

    def start_poll(self, full: bool) -> DirectoryPolled | None:
        q = self.memory.ask(full, time.monotonic())
        if q is None:                            # nothing kept to poll against: skip it
            return DirectoryPolled(frozenset())
        threading.Thread(target=self.poll_directory, args=(q,), daemon=True).start()
        return None

    def write_status(self, record: StatusRecord) -> StatusWritten:
        shown = record.as_json()
        shown["written"] = time.time()          # ``status`` knows a stale file by it
        if self.publisher is not None:
            shown["publish"] = self.publisher.report()
        try:
            status_file.write(self.s.status or "", shown, self.s.prom_file)
        except OSError as err:
            return StatusWritten(str(err))
        return StatusWritten()

    # ---- main loop
    def run(self) -> int:
        cdb = self.s.cdb or ""
        try:                        # one daemon per tree: the second exits at once
            instance = take_lock(cdb + ".daemon", 0, what="qmail-updater run")
        except UpdaterError as err:
            raise UpdaterError(f"{err}: exiting") from None
        reader = Reader(self.s.fifo, self.s.fifo_mode, self.log, group=self.s.fifo_group)

        def stop(n: int, f: FrameType | None) -> None:
            self.stop_event.set()
            self.events.put(Stop())
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
        for sig in (signal.SIGHUP, signal.SIGALRM):
            signal.signal(sig, lambda n, f: self.events.put(
                Requested(f"signal {signal.Signals(n).name}", immediate=True)))
        threading.Thread(target=self.fifo_thread, args=(reader,), daemon=True).start()
        self.log(f"started: cdb {cdb}, trigger {self.s.fifo}, quiet {self.s.quiet:g}s, "
                 f"max delay {self.s.max_delay:g}s, safety net {self.s.interval:g}s")
        self.watcher.start()             # before the first build: no change slips between
        for action in self.scheduler.start():
            answer = self.act(action)
            if answer is not None:
                self.feed(answer)
        while self.running:
            self.step()
        self.watcher.stop()
        if self.publisher is not None:
            self.publisher.stop()
        reader.close()
        os.close(instance)
        self.log("stopped")
        return 0

    def step(self) -> None:
        """Wait for the next event or deadline, and handle it."""
        deadline = self.scheduler.next_deadline()
        timeout = DAEMON_IDLE if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            event = self.events.get(timeout=min(timeout, DAEMON_IDLE))
        except queue.Empty:
            event = Tick()
        if isinstance(event, FileChanged):
            event = self.memory.resolve(event)
        elif isinstance(event, DirectoryPolled):
            event = self.memory.applied(event)
        self.feed(event)
        if not isinstance(event, Tick) and deadline is not None and \
                deadline <= time.monotonic():
            self.feed(Tick())           # a stream of events never holds back what is due
