"""Push each installed validrcptto.cdb to the other MX hosts with rsync.

Targets (``UPDATER_PUBLISH``, separated by white space or commas):

* ``[user@]host:/path/validrcptto.cdb`` — over ssh, never prompting (BatchMode, a known
  hosts file, an identity, a port);
* ``rsync://host[:port]/module/path/validrcptto.cdb`` — an rsync daemon.

rsync writes a temporary file beside the target and renames it into place, so a reader
on the receiver sees the old or the new whole file, never a part; ``--checksum`` leaves
an unchanged target alone.  Every target has its own worker: a dead MX neither delays
the local install nor the other targets.  A failed push is retried with backoff; a newer
install supersedes a pending retry (the push always sends the live file as it is then,
so an old list is never sent after a newer one).

``rsync_argv`` builds the command line;
``Publisher`` runs the workers.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import Settings
from .errors import ConfigError
from .targets import Target, parse_targets


def rsync_argv(target: Target, source: str, settings: Settings) -> list[str]:
    """The rsync command that pushes ``source`` to ``target`` (pure)."""
    timeout = max(1, int(settings.publish_timeout))
    argv = [settings.rsync, "--checksum", "--times", "--perms", "--chmod=F644",
            f"--timeout={timeout}"]
    if target.kind == "rsyncd":
        argv.append(f"--contimeout={timeout}")
    if target.kind == "ssh":
        ssh = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
               "-o", f"ConnectTimeout={timeout}", "-o", "ServerAliveInterval=5",
               "-o", "ServerAliveCountMax=2"]
        if settings.ssh_known_hosts:
            ssh += ["-o", f"UserKnownHostsFile={settings.ssh_known_hosts}"]
        if settings.ssh_identity:
            ssh += ["-o", "IdentitiesOnly=yes", "-i", settings.ssh_identity]
        if settings.ssh_port:
            ssh += ["-p", str(settings.ssh_port)]
        argv += ["-e", " ".join(_quote(a) for a in ssh)]
    elif settings.rsync_password_file:
        argv.append(f"--password-file={settings.rsync_password_file}")
    return argv + ["--", source, target.spec]


def _quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)


def push(target: Target, source: str, settings: Settings) -> str | None:
    """One push; None when it worked, else one line saying why (never a prompt: stdin
    is /dev/null, and the whole run is killed after UPDATER_PUBLISH_TIMEOUT x 2)."""
    argv = rsync_argv(target, source, settings)
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=settings.publish_timeout * 2,
                              start_new_session=True)
    except FileNotFoundError:
        return f"cannot run {settings.rsync}: not found"
    except subprocess.TimeoutExpired:
        return f"timed out after {settings.publish_timeout * 2:g}s"
    if done.returncode != 0:
        lines = [line for line in done.stderr.decode("utf-8", "replace").splitlines()
                 if line.strip()]
        detail = lines[0][:200] if lines else ""
        from .textsafe import printable
        return f"rsync exited {done.returncode}" + (
            f": {printable(detail.encode(), backslash=False)}" if detail else "")
    return None


# --------------------------------------------------------------------------- the workers

@dataclass
class State:
    """What the status file and the metrics say about one target."""
    wanted: int = 0                   # the local install it should hold (a counter)
    wanted_at: float | None = None    # when that install happened
    sent: int = 0                     # the newest install it is known to hold
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failures: int = 0
    retry_at: float = 0.0
    busy: bool = False

    def lag(self, now: float) -> float:
        """Seconds the target has been behind the local list (0: up to date)."""
        if self.sent >= self.wanted or self.wanted_at is None:
            return 0.0
        return max(0.0, now - self.wanted_at)

    def report(self, now: float) -> dict[str, Any]:
        return {"last_success": self.last_success, "last_error": self.last_error,
                "last_error_at": self.last_error_at, "failures": self.failures,
                "lag_seconds": round(self.lag(now), 3), "up_to_date": self.sent >= self.wanted}


@dataclass
class Publisher:
    settings: Settings
    source: str                               # the live cdb
    log: Callable[[str], None]
    changed: Callable[[], None] = lambda: None  # a target's state changed (write status)
    targets: list[Target] = field(default_factory=list)
    states: dict[str, State] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lock = threading.Condition()
        self.version = 0
        self.stopping = False
        for t in self.targets:
            self.states[t.spec] = State()
        self.threads = [threading.Thread(target=self._worker, args=(t,), daemon=True,
                                         name=f"publish {t.spec}") for t in self.targets]
        for th in self.threads:
            th.start()

    def installed(self) -> None:
        """A new cdb is live: every target wants it now (a pending retry is superseded)."""
        with self.lock:
            self.version += 1
            now = time.time()
            for st in self.states.values():
                st.wanted, st.wanted_at, st.retry_at = self.version, now, 0.0
            self.lock.notify_all()

    def report(self) -> dict[str, Any]:
        now = time.time()
        with self.lock:
            return {spec: st.report(now) for spec, st in self.states.items()}

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify_all()

    def _worker(self, target: Target) -> None:
        from .retry import backoff
        st = self.states[target.spec]
        while True:
            with self.lock:
                while not self.stopping and (st.sent >= st.wanted or
                                             time.monotonic() < st.retry_at):
                    wait = None if st.sent >= st.wanted else st.retry_at - time.monotonic()
                    self.lock.wait(wait)
                if self.stopping:
                    return
                version, st.busy = st.wanted, True
            why = push(target, self.source, self.settings)
            with self.lock:
                st.busy = False
                now = time.time()
                if why is None:
                    st.sent = max(st.sent, version)
                    st.last_success, st.failures = now, 0
                else:
                    st.failures += 1
                    st.last_error, st.last_error_at = why, now
                    delay = backoff(st.failures, self.settings.retry_min,
                                    self.settings.retry_max)
                    if st.wanted == version:        # a newer install retries at once
                        st.retry_at = time.monotonic() + delay
            if why is None:
                self.log(f"published to {target.spec}")
            else:
                self.log(f"publish to {target.spec} failed: {why}; "
                         + ("retry in " + f"{delay:g}s" if st.wanted == version
                            else "a newer list is next"))
            self.changed()


def publish_once(settings: Settings, source: str, log: Callable[[str], None]) -> int:
    """``qmail-updater publish``: push the live cdb to every target at once, in parallel;
    0 when every push worked."""
    targets = parse_targets(settings.publish)
    if not targets:
        raise ConfigError("nothing to publish to: set UPDATER_PUBLISH or --publish")
    if not os.path.isfile(source):
        raise ConfigError(f"{source}: no cdb to publish (run qmail-updater build)")
    results: dict[str, str | None] = {}

    def one(t: Target) -> None:
        results[t.spec] = push(t, source, settings)
    threads = [threading.Thread(target=one, args=(t,)) for t in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t in targets:
        why = results[t.spec]
        log(f"published to {t.spec}" if why is None else f"publish to {t.spec} failed: {why}")
    return 0 if all(results[t.spec] is None for t in targets) else 1
