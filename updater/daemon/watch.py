"""The file watches: which directories the list depends on (``watch_targets``), which
changes in them matter (``interesting``), and the watchdog observer that reports them,
by inotify, falling back to polling when inotify refuses (no instance or watch left)
or the watcher thread dies."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..build.generate import CONTROL_FILES
from ..build.inputs import Inputs
from ..config import Settings

if TYPE_CHECKING:                   # (watchdog is imported when the daemon starts watching)
    from watchdog.events import FileSystemEvent
    from watchdog.observers.api import BaseObserver

WatchPlan = dict[str, tuple[set[str], tuple[str, ...]]]


def watch_targets(settings: Settings, record: Inputs | None
                  ) -> dict[str, tuple[set[str], tuple[str, ...]]]:
    """directory -> (file names, name prefixes) whose change can change the list: the
    global inputs' directories always, and what the last build's record says it read
    (the homes the delivery chain looked at, the fastforward cdbs it read).

    Directories rather than files, so a replace-by-rename is seen.  Before the first
    build, or while builds fail, the control, users and alias directories are still
    watched, so fixing them triggers the next build.  Users' own homes are left to the
    FIFO and the safety net."""
    targets: dict[str, tuple[set[str], tuple[str, ...]]] = {}

    def add(directory: str, names: Iterable[str] = (), prefixes: Iterable[str] = ()) -> None:
        got_names, got_prefixes = targets.setdefault(os.path.abspath(directory), (set(), ()))
        got_names.update(names)
        targets[os.path.abspath(directory)] = (got_names, tuple(set(got_prefixes) | set(prefixes)))

    add(os.path.join(settings.qmail_dir, "control"), CONTROL_FILES)
    add(os.path.join(settings.qmail_dir, "users"), ("assign", "cdb"))
    add(os.path.join(settings.qmail_dir, "alias"), (), (".qmail",))
    for site in (settings.include, settings.exclude):
        add(os.path.dirname(site), (os.path.basename(site),))
    if settings.passwd:
        add(os.path.dirname(os.path.abspath(settings.passwd)), (os.path.basename(settings.passwd),))
    if record is not None:
        for home, how in record.homes.items():
            if how == "alias":
                add(home, (), (".qmail",))
            elif not how.startswith("account "):     # users' own homes: the FIFO's job
                add(home, ("vpasswd", "vpasswd.cdb"), (".qmail",))
        for path in record.files:
            add(os.path.dirname(path), (os.path.basename(path),))
    return targets


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


class Watcher:
    """watchdog on the directories ``watch_targets`` names; ``on_change(kind, path)`` is
    called (in the observer's thread) for every interesting change."""

    def __init__(self, settings: Settings, log: Callable[[str], None],
                 on_change: Callable[[str, str], None], ignore: set[str]):
        self.s, self.log, self.on_change, self.ignore = settings, log, on_change, ignore
        self.observer: BaseObserver | None = None
        self.polling = settings.poll > 0
        self.targets: WatchPlan = {}
        self.record: Inputs | None = None

    def start(self, record: Inputs | None = None) -> None:
        """(Re)start the watches when the directories to watch changed (``record``: what
        the last build read; None keeps the last one's)."""
        if record is not None:
            self.record = record
        targets = {d: t for d, t in watch_targets(self.s, self.record).items()
                   if os.path.isdir(d)}
        if targets == self.targets and self.observer is not None and self.observer.is_alive():
            return
        self.targets = targets
        # the new watches start before the old ones stop, so no change falls between
        # them (one seen twice is one more request, debounced); only when the new ones
        # cannot start are the old ones stopped first, freeing their inotify watches
        old, self.observer = self.observer, None
        while True:
            observer = None
            try:
                observer = self._observer(targets)
                observer.start()
            except OSError as err:
                _halt(observer)
                if old is not None:
                    _halt(old)
                    old = None
                    continue
                if self.polling:
                    self.log(f"cannot watch files ({err}); relying on triggers and the "
                             "safety net")
                    return
                self.log(f"inotify refused ({err}); falling back to polling")
                self.polling = True
                continue
            _halt(old)
            self.observer = observer
            self.log(f"watching {len(targets)} directories"
                     f"{' by polling' if self.polling else ''}")
            return

    def _observer(self, targets: WatchPlan) -> BaseObserver:
        from watchdog import events
        from watchdog.events import (
            FileClosedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
            FileSystemEventHandler,
        )
        watcher = self
        # Only changes: no inotify events for the thousands of files a build merely reads.
        # A mode or owner changed (chmod, chown: IN_ATTRIB) is one too: a vpasswd made
        # unreadable, or given to another user, must show at once, not at the next build.
        changes = [FileCreatedEvent, FileModifiedEvent, FileDeletedEvent, FileMovedEvent,
                   FileClosedEvent, *([events.FileAttribEvent]
                                      if hasattr(events, "FileAttribEvent") else [])]

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("opened", "closed_no_write") or event.is_directory:
                    return
                for path in (event.src_path, getattr(event, "dest_path", "")):
                    if isinstance(path, bytes):
                        path = os.fsdecode(path)
                    if interesting(path, watcher.targets, watcher.ignore):
                        watcher.on_change(event.event_type, path)
                        return

        observer: BaseObserver
        if self.polling:
            from watchdog.observers.polling import PollingObserver
            observer = PollingObserver(timeout=self.s.poll or 5.0)
        else:
            from watchdog.observers import Observer
            observer = Observer()       # EMFILE here: no inotify instance left
        for directory in sorted(targets):
            try:
                observer.schedule(Handler(), directory, recursive=False, event_filter=changes)
            except TypeError:           # a watchdog older than 4.0: every event
                observer.schedule(Handler(), directory, recursive=False)
        return observer

    def check(self) -> None:
        """A watcher thread that died is replaced by polling."""
        if self.observer is not None and not self.observer.is_alive():
            self.log("the file watcher died; restarting it by polling")
            self.polling = True
            self.observer = None
            self.start()

    def stop(self) -> None:
        _halt(self.observer)
        self.observer = None


def _halt(observer: BaseObserver | None) -> None:
    """Stop a watchdog observer and wait for its thread (a broken one is let go)."""
    if observer is None:
        return
    try:
        observer.stop()
        observer.join(5)
    except Exception:
        pass
