"""One --listen worker process: its state (cached controls, cdb snapshots, rules, the
sessions), the accept loop, the read-deadline sweep, SIGHUP and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Coroutine
from typing import Any

from ..checker import CdbGetter
from ..limits import OWED_WAIT, RULES_LOG_EVERY
from ..serving import skeleton
from ..serving.anvil import Limits
from ..serving.cdbfile import CdbCache
from ..serving.child import LIVE
from ..serving.controlfiles import ControlError, morercpthosts_path
from ..serving.metrics import Metrics
from ..serving.watched import CONTROL_FILES, Watched
from ..smtp.context import Controls
from .connection import SmtpProtocol
from .controls import IpMe, read_controls, read_file
from .options import SmtpdOptions
from .prog import log
from .queue import AsyncQueue


class Worker:
    """One process's state: the cached controls, cdb snapshots, rules; the sessions."""

    def __init__(self, opts: SmtpdOptions, limits: Limits, metrics: Metrics):
        self.o, self.limits, self.metrics = opts, limits, metrics
        self.ipme = IpMe()
        # tcpserver's children get its environment, less what it sets per connection
        # (and --checkpassword, which sessions run as tcpserver's would $CHECKPASSWORD)
        self.base_env = {k: v for k, v in os.environ.items()
                         if not k.startswith("TCP") and k not in ("RELAYCLIENT", "PROTO")}
        if opts.checkpassword:
            self.base_env["CHECKPASSWORD"] = opts.checkpassword
        # each control file its own last good copy: one that cannot be read (or is
        # being written) keeps its own, and never holds back a change to another
        self.files = {name: watched_file(opts.qmail_dir, name) for name in CONTROL_FILES}
        self.composed: tuple[tuple[Any, ...], Controls] | None = None
        self.cdbs: dict[str, CdbCache] = {}
        self.rules = CdbCache(opts.rules, log, strict=True) if opts.rules else None
        from .secure import checkpassword_argv, timeout_of
        self.tls = opts.tls                       # loaded before --user (keys are private)
        self.checkpw = checkpassword_argv(self.base_env)
        self.checkpw_timeout = timeout_of(self.base_env)
        self.sessions: set[SmtpProtocol] = set()
        self.cleanups: set[asyncio.Task[None]] = set()   # qmail-queue aborts still running
        self.stopping = False
        self.grace_over = False
        self.serial = 0
        self.rules_dropped = 0                    # connections dropped for unreadable rules
        self.rules_logged = float("-inf")

    def current_controls(self) -> Controls:
        """The controls from each file's current copy, composed again only when one of
        them was read again (ControlError where qmail-smtpd would die_control)."""
        values = tuple(self.files[n].current() for n in CONTROL_FILES)
        if self.composed is None or any(a is not b for a, b in zip(values, self.composed[0])):
            got = dict(zip(CONTROL_FILES, values))
            self.composed = (values, read_controls(self.o.qmail_dir, {}, got.__getitem__))
        return self.composed[1]

    def reload(self) -> None:
        """SIGHUP: controls and rules are read again at the next connection."""
        for w in self.files.values():
            w.forget()
        for c in self.cdbs.values():
            c.forget()
        if self.rules is not None:
            self.rules.forget()
        from .secure import tls_context
        fresh = tls_context(self.o.qmail_dir, os.environ, log)        # renewed certificates
        if fresh is not None or self.tls is None:
            self.tls = fresh
        else:
            log("TLS: keeping the certificate loaded before")
        log("SIGHUP: re-reading controls, rules and the TLS certificate")

    def cleanup(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a clean-up (a qmail-queue abort) to its end, whatever the session does."""
        task = asyncio.get_running_loop().create_task(coro)
        self.cleanups.add(task)
        task.add_done_callback(self.cleanups.discard)

    def rules_current(self) -> CdbGetter:
        """The rules cdb for a new connection; OSError (tcpserver drops the connection)
        when it cannot be read or is not a whole cdb.  Readable again after drops: one
        line says so."""
        if self.rules is None:
            raise OSError("no rules")
        getter = self.rules.current()
        if self.rules_dropped:
            log(f"rules {self.o.rules} readable again: {self.rules_dropped} connection(s) "
                "were dropped while they were not")
            self.rules_dropped, self.rules_logged = 0, float("-inf")
        return getter

    def rules_failed(self, err: OSError, ident: int, where: str) -> None:
        """A connection dropped for unreadable rules: logged at the first and then once a
        minute while it lasts, with the count (a flood cannot flood the log)."""
        self.rules_dropped += 1
        now = time.monotonic()
        if now - self.rules_logged >= RULES_LOG_EVERY:
            self.rules_logged = now
            log(f"deny {ident} {where}: {self.rules_error(err)}; every connection is dropped "
                f"until it is fixed ({self.rules_dropped} so far)")

    def rules_error(self, err: OSError) -> str:
        return f"cannot read rules {self.o.rules}: {err.strerror or err}"

    def cdb(self, path: str, shown: bool = False) -> CdbGetter:
        cache = self.cdbs.get(path)
        if cache is None:
            cache = self.cdbs[path] = CdbCache(path, log, need_records=shown)
        getter = cache.current()
        if shown:                                   # the validrcptto.cdb, for /metrics
            self.metrics.set("cdb_entries", cache.entries)
            self.metrics.set("cdb_mtime", cache.mtime)
        return getter

    def setup(self, env: dict[str, str]
              ) -> tuple[Controls, CdbGetter | None, CdbGetter | None]:
        """qmail-smtpd's setup(): (controls, validrcptto, morercpthosts); ControlError."""
        try:
            controls = self.current_controls()  # (DATABYTES: open_session applies it)
            cdb = self.cdb(env["VALIDRCPTTO_CDB"], shown=True) \
                if env.get("VALIDRCPTTO_CDB") else None
            more = None
            if controls.rcpthosts is not None:
                try:
                    more = self.cdb(morercpthosts_path(self.o.qmail_dir))
                except FileNotFoundError:
                    more = None
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            raise ControlError(f"{where}{err.strerror or err}") from None
        return controls, cdb, more

    # ---- the sessions: counted here, whatever a connection does
    def next_id(self) -> int:
        self.serial += 1
        return self.serial

    def opened(self, conn: SmtpProtocol) -> None:
        self.sessions.add(conn)
        self.metrics.add("sessions_open")

    def closed(self, conn: SmtpProtocol) -> None:
        if conn in self.sessions:
            self.sessions.discard(conn)
            self.metrics.add("sessions_open", -1)

    # ---- what the serving skeleton asks of a server (skeleton.Service)
    def protocol(self) -> SmtpProtocol:
        return SmtpProtocol(self)

    def sweep(self, now: float) -> None:
        """The sessions' read deadlines."""
        for p in list(self.sessions):
            if p.session is not None and p.session.deadline <= now:
                p.on_timeout()

    def started(self) -> None:
        if self.rules is not None:
            try:
                self.rules_current()
            except OSError as err:
                log(f"{self.rules_error(err)}; every connection is dropped until it is fixed")

    async def drain(self) -> None:
        """SIGTERM: the sessions have --grace seconds, then 421 between commands; the
        replies owed after a message go out; what is left is closed, and no qmail-queue
        or checkpassword child outlives the worker."""
        loop = asyncio.get_running_loop()
        self.stopping = True
        log(f"SIGTERM: not accepting; {len(self.sessions)} sessions have {self.o.grace:g}s")
        deadline = loop.time() + self.o.grace
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.grace_over = True
        for p in list(self.sessions):
            p.shut_down()
        deadline = loop.time() + OWED_WAIT           # sessions owed a reply after a message
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for p in list(self.sessions):
            if p.transport is not None:
                p.transport.abort()
        await asyncio.sleep(0)                       # their connection_lost: tasks cancelled
        if self.cleanups:
            await asyncio.wait(list(self.cleanups), timeout=AsyncQueue.ABORT_WAIT + 1)
        for child in list(LIVE):                     # nothing is left behind unreaped
            child.kill()


def run_worker(opts: SmtpdOptions, sock: socket.socket, limits: Limits, metrics: Metrics) -> int:
    """One worker process: the skeleton's loop around a ``Worker``."""
    worker = Worker(opts, limits, metrics)
    return skeleton.run(worker, [sock], log, worker.started)


def watched_file(qmail_dir: str, name: str) -> Watched[Any]:
    path = os.path.join(qmail_dir, "control", name)
    return Watched([path], lambda: read_file(qmail_dir, name), log, name)
