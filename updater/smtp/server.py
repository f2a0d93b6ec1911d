"""validrcptto-smtpd --listen HOST:PORT: the long-running server, the recommended
deployment (no Python start-up per connection).

One asyncio event loop per worker process drives a ``session.Session`` per connection
(asyncio Protocols: no threads, no select() fd limit); ``--workers N`` processes share
the port with SO_REUSEPORT.  Per connection it does what ``tcpserver -x RULES`` +
qmail-smtpd do: tcpserver's rules (allow / deny / environment), the TCP* variables,
qmail-smtpd's controls, a snapshot of validrcptto.cdb that nothing on disk can pull from
under it (``cdbfile``), read and write time-outs (control/timeoutsmtpd), DATA streamed
into qmail-queue.  Bounded: ``--max-connections`` in all and ``--max-per-ip`` per client
(past either: ``421`` and close), a command line is at most 4 KiB, a read 64 KiB.  Out of
descriptors on accept: one log line, accepting pauses a second, sessions go on.

Lifecycle: bind (as root for port 25), then ``--user`` (its uid and gid, no
supplementary groups); SIGHUP re-reads the controls and the rules; SIGTERM stops
accepting, lets sessions finish for ``--grace`` seconds, then answers the rest ``421``
between commands and closes them; exit 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time

from . import events as E
from .params import peer_from_env, policy_from_env, scan_ulong
from .session import Session
from .cdbfile import CdbCache
from .child import LIVE, Child, spawn
from .metrics import Metrics
from .controls import ControlError, IpMe, morercpthosts_path, read_controls

PROG = "validrcptto-smtpd"
HOLD_MAX = 65536            # client input held while the session cannot take it
SWEEP = 0.5                 # seconds between checks of the sessions' read deadlines
R_BUSY = b"421 too many connections, try again later (#4.3.2)\r\n"
R_BUSY_IP = b"421 too many connections from your address, try again later (#4.3.2)\r\n"
R_CONTROLS = b"421 unable to read controls (#4.3.0)\r\n"
R_SHUTDOWN = b"421 service shutting down, closing connection (#4.3.2)\r\n"


def log(text: str) -> None:
    try:
        os.write(2, f"{PROG}[{os.getpid()}]: {text}\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass


async def write_fd(fd: int, data: bytes) -> bool:
    """Write all of ``data`` to a pipe from the event loop (no thread); False when the
    reader went away."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
            continue
        except BlockingIOError:
            pass
        except OSError:
            return False
        ready = loop.create_future()
        loop.add_writer(fd, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_writer(fd)
    return True


class AsyncQueue:
    """qmail-queue from the event loop: started with posix_spawn (no fork of this big
    process, no helper thread) with the session's environment, the message written to
    its fd 0 as it arrives, the envelope to its fd 1 at the end, its exit noticed
    through a pidfd.  The process is owned (``child.Child``) until reaped, on every
    path: ``abort`` closes the pipes (qmail-queue then gives up by itself, as it does
    when qmail-smtpd dies) and kills it if it has not ended within ABORT_WAIT."""

    ABORT_WAIT = 5.0

    def __init__(self, program: str, qmail_dir: str, env: dict[str, str]):
        self.program, self.qmail_dir, self.env = program, qmail_dir, env
        self.child: Child | None = None
        self.msg_w = self.env_w = -1
        self.status: int | None = 0
        self.write_failed = False

    async def start(self) -> int | None:
        try:
            m_r, self.msg_w = os.pipe2(os.O_CLOEXEC)
            e_r, self.env_w = os.pipe2(os.O_CLOEXEC)
        except OSError:
            self._close_pipes()
            return None
        try:
            # qmail-queue runs in QMAIL_DIR, which is the server's working directory
            # (posix_spawn cannot chdir); qmail: chdir failing is 61, exec failing 120
            if os.getcwd() != self.qmail_dir:
                os.chdir(self.qmail_dir)
            self.child = spawn(self.program, [self.program], self.env,
                               [(os.POSIX_SPAWN_DUP2, m_r, 0), (os.POSIX_SPAWN_DUP2, e_r, 1)])
        except OSError as err:
            self.status = 61 if err.filename == self.qmail_dir else 120
        finally:
            os.close(m_r)
            os.close(e_r)
        if self.child is None:
            self._close_pipes()
            return os.getpid()
        return self.child.pid

    async def put(self, data: bytes) -> None:
        if self.msg_w == -1 or self.write_failed:
            self.write_failed = True
            return
        if not await write_fd(self.msg_w, data):
            self.write_failed = True

    async def close(self, envelope: bytes | None) -> tuple[int | None, bool]:
        self._close(self.msg_w)
        self.msg_w = -1
        if envelope is not None and self.child is not None and not self.write_failed:
            if not await write_fd(self.env_w, envelope):
                self.write_failed = True
        self._close_pipes()
        if self.child is None:
            return self.status, self.write_failed
        try:
            await self.child.wait()
        finally:                      # cancelled while waiting: still ours to reap
            if not self.child.reaped:
                self.child.kill()
        return self.child.exit_code(), self.write_failed

    async def abort(self) -> None:
        self._close_pipes()
        if self.child is None:
            return
        try:
            await self.child.wait(self.ABORT_WAIT)
        finally:
            self.child.kill()         # a no-op once reaped

    def kill(self) -> None:
        """Synchronous: the pipes closed, the process killed and reaped (soon)."""
        self._close_pipes()
        if self.child is not None:
            self.child.kill()

    @staticmethod
    def _close(fd: int) -> None:
        if fd != -1:
            try:
                os.close(fd)
            except OSError:
                pass

    def _close_pipes(self) -> None:
        self._close(self.msg_w)
        self._close(self.env_w)
        self.msg_w = self.env_w = -1


class Limits:
    """Connections in all and per client address, across the worker processes.

    Each worker counts its own sessions in its own row of shared memory (a total and
    a table of per-address counters; addresses are hashed into slots, so a collision
    can only make the per-address limit stricter).  A worker reads every row to
    decide and writes only its own, so there is no lock for a dying worker to hold;
    the supervisor zeroes the row of a worker that died before it starts the next
    one.  Two workers deciding at the same instant may each admit one more: the
    limits can be passed by at most (workers - 1) for a moment."""
    SLOTS = 4096

    def __init__(self, total: int, per_ip: int, workers: int):
        self.total, self.per_ip, self.workers = total, per_ip, workers
        if workers > 1:
            import multiprocessing
            self.counts = multiprocessing.RawArray("i", workers)
            self.slots = multiprocessing.RawArray("i", workers * self.SLOTS)
        else:
            self.counts = [0]
            self.slots = [0] * self.SLOTS
        self.row = 0

    def slot(self, ip: str) -> int:
        import zlib
        return zlib.crc32(ip.encode()) % self.SLOTS

    def take(self, ip: str) -> bytes | None:
        """None when the connection may go on, else the reply that refuses it."""
        if sum(self.counts) >= self.total:
            return R_BUSY
        slot = self.slot(ip)
        if self.per_ip and sum(self.slots[r * self.SLOTS + slot]
                               for r in range(self.workers)) >= self.per_ip:
            return R_BUSY_IP
        self.counts[self.row] += 1
        self.slots[self.row * self.SLOTS + slot] += 1
        return None

    def give(self, ip: str) -> None:
        self.counts[self.row] -= 1
        self.slots[self.row * self.SLOTS + self.slot(ip)] -= 1

    def clear(self, row: int) -> None:
        """The worker of this row is dead: its sessions are gone with it."""
        self.counts[row] = 0
        base = row * self.SLOTS
        self.slots[base:base + self.SLOTS] = [0] * self.SLOTS


class Worker:
    """One process's state: the cached controls, cdb snapshots, rules; the sessions."""

    def __init__(self, opts: Options, limits: Limits, metrics: Metrics):
        self.o, self.limits, self.metrics = opts, limits, metrics
        self.ipme = IpMe()
        # tcpserver's children get its environment, less what it sets per connection
        self.base_env = {k: v for k, v in os.environ.items()
                         if not k.startswith("TCP") and k not in ("RELAYCLIENT", "PROTO")}
        self.controls = None
        self.cdbs: dict[str, CdbCache] = {}
        self.rules = CdbCache(opts.rules, log, strict=True) if opts.rules else None
        from .secure import checkpassword_argv, timeout_of
        self.tls = opts.tls                       # loaded before --user (keys are private)
        self.checkpw = checkpassword_argv(os.environ)
        self.checkpw_timeout = timeout_of(os.environ)
        self.sessions: set[SmtpProtocol] = set()
        self.cleanups: set[asyncio.Task] = set()   # qmail-queue aborts still running
        self.stopping = False
        self.grace_over = False
        self.serial = 0

    def reload(self) -> None:
        """SIGHUP: controls and rules are read again at the next connection."""
        self.controls = None
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

    def cleanup(self, coro) -> None:
        """Run a clean-up (a qmail-queue abort) to its end, whatever the session does."""
        task = asyncio.get_running_loop().create_task(coro)
        self.cleanups.add(task)
        task.add_done_callback(self.cleanups.discard)

    def rules_current(self):
        """The rules cdb for a new connection; OSError (tcpserver drops the connection)
        when it cannot be read or is not a whole cdb."""
        return self.rules.current()

    def rules_error(self, err: OSError) -> str:
        return f"cannot read rules {self.o.rules}: {err.strerror or err}"

    def cdb(self, path: str, shown: bool = False):
        cache = self.cdbs.get(path)
        if cache is None:
            cache = self.cdbs[path] = CdbCache(path, log)
        getter = cache.current()
        if shown:                                   # the validrcptto.cdb, for /metrics
            self.metrics.set("cdb_entries", cache.entries)
            self.metrics.set("cdb_mtime", cache.mtime)
        return getter

    def setup(self, env: dict):
        """qmail-smtpd's setup(): (controls, validrcptto, morercpthosts); ControlError."""
        try:
            if self.controls is None:
                self.controls = read_controls(self.o.qmail_dir, {})
            controls = self.controls
            if env.get("DATABYTES") is not None:
                databytes = scan_ulong(env["DATABYTES"]) & 0xFFFFFFFF
                controls = controls._replace(databytes=databytes - (databytes == 0xFFFFFFFF))
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


class SmtpProtocol(asyncio.Protocol):
    """One connection: the session's events carried out on an asyncio transport.

    Input the session has not taken yet (while a queue or AUTH step is awaited, or
    while the client is not taking our replies) waits in ``backlog``.  Reading stops
    while the client is not taking our replies (``out_paused``, from the transport's
    write high-water mark) and while more than HOLD_MAX bytes wait; it goes on
    otherwise, so a client hanging up is noticed at once, even during AUTH or while
    qmail-queue works.  So one session holds at most: HOLD_MAX plus one read of
    input, the transport's write buffer, and one batch of replies (session.BATCH
    lines)."""

    def __init__(self, worker: Worker):
        self.w = worker
        self.loop = asyncio.get_running_loop()
        self.transport = None
        self.session: Session | None = None
        self.write_timer = None
        self.queue: AsyncQueue | None = None
        self.backlog: list[bytes] = []        # input the session has not taken yet
        self.held = 0                         # bytes in backlog
        self.task: asyncio.Task | None = None
        self.out_paused = False
        self.ip = "?"
        self.env: dict[str, str] = {}
        self.switching = False
        self.shutdown = False                 # we said 421 shutting down
        self.started = 0.0
        self.counted = False
        self.id = 0
        self.done = False

    # ---- connection
    def connection_made(self, transport) -> None:
        try:
            self._connection_made(transport)
        except Exception as err:                 # a bug: this connection ends, not us
            log(f"session {self.ip} ended by {type(err).__name__}: {err}")
            transport.abort()

    def _connection_made(self, transport) -> None:
        w = self.w
        self.transport = transport
        w.serial += 1
        self.id = w.serial
        peer = transport.get_extra_info("peername") or ("unknown", 0)
        local = transport.get_extra_info("sockname") or ("unknown", 0)
        self.ip = ip = peer[0]
        if ip.startswith("::ffff:") and "." in ip:
            self.ip = ip = ip[7:]
        where = f"{local[0]}:{local[1]} {ip}:{peer[1]}"
        rule = None
        if w.rules is not None:
            from .tcprules import lookup
            try:
                rule = lookup(w.rules_current(), ip)
            except OSError as err:           # tcpserver drops the connection, and logs
                w.metrics.add("connections_refused.rules")
                log(f"deny {self.id} {where}: {w.rules_error(err)}")
                transport.abort()
                return
            if not rule.allow:
                w.metrics.add("connections_refused.rules")
                if w.o.verbose:
                    log(f"deny {self.id} {where}")
                transport.abort()
                return
        refusal = w.limits.take(ip)
        if refusal is not None:
            w.metrics.add("connections_refused.busy" if refusal is R_BUSY
                          else "connections_refused.per_ip")
            if w.o.verbose:
                log(f"busy {self.id} {where}")
            transport.write(refusal)
            transport.close()
            return
        self.counted = True
        self.started = time.monotonic()
        w.metrics.add("sessions_open")
        w.sessions.add(self)
        # the environment tcpserver gives qmail-smtpd (and so qmail-queue and
        # checkpassword): its own, PROTO and the TCP* variables, then the rule's
        env = dict(w.base_env)
        env.update(PROTO="TCP", TCPREMOTEIP=ip, TCPREMOTEPORT=str(peer[1]),
                   TCPLOCALIP=local[0], TCPLOCALPORT=str(local[1]))
        if w.o.local_name:
            env["TCPLOCALHOST"] = w.o.local_name
        if rule is not None:
            for k, v in rule.env.items():
                if v is None:
                    env.pop(k, None)
                else:
                    env[k] = v
        self.env = env
        if w.o.verbose:
            log(f"ok {self.id} {where}")
        try:
            controls, cdb, more = w.setup(env)
        except ControlError as err:
            log(f"unable to read controls: {err}")
            transport.write(R_CONTROLS)
            self.finish()
            return
        self.timeout = controls.timeout
        self.write_timeout = w.o.write_timeout or controls.timeout
        self.session = Session(controls, peer_from_env(env),
                                 policy_from_env(env, tls=w.tls is not None,
                                                   auth=w.checkpw is not None),
                                 validrcptto=cdb, morercpthosts=more, ipme=w.ipme,
                                 clock=time.time, monotonic=time.monotonic)
        self.program = env.get("QMAILQUEUE") or os.path.join(w.o.qmail_dir, "bin", "qmail-queue")
        self.run(self.session.start())

    def connection_lost(self, exc) -> None:
        self.done = True
        self.backlog.clear()
        self.held = 0
        self._cancel_timers()
        if self.task is not None and not self.task.done():
            self.task.cancel()                   # its handlers kill what it started
        elif self.queue is not None:             # between two reads of a message
            self.w.cleanup(self.queue.abort())
            self.queue = None
        if self.counted:
            self.counted = False
            self.w.limits.give(self.ip)
            self.w.sessions.discard(self)
            m = self.w.metrics
            m.add("sessions_open", -1)
            if self.session is not None:
                m.session_ended(self.session.counts,
                                "shutdown" if self.shutdown else self.session.end_reason,
                                time.monotonic() - self.started)
            if self.w.o.verbose:
                ok = self.session is not None and self.session.quit
                log(f"end {self.id} status {0 if ok else 1}")

    def finish(self) -> None:
        self._cancel_timers()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _cancel_timers(self) -> None:
        if self.write_timer is not None:
            self.write_timer.cancel()
        self.write_timer = None

    # ---- input
    def data_received(self, data: bytes) -> None:
        try:
            if self.session is None or self.done:
                return
            self.backlog.append(data)
            self.held += len(data)
            if self.switching:                  # mid-STARTTLS: the transport is changing
                if self.held > HOLD_MAX:
                    self.transport.abort()
                return
            self.pump()
        except Exception as err:                 # a bug: this connection ends, not us
            log(f"session {self.ip} ended by {type(err).__name__}: {err}")
            self.transport.abort()

    def eof_received(self):
        if self.session is not None and not self.done:
            self.backlog.append(b"")
            self.pump()
        return False

    def on_timeout(self) -> None:
        if self.session is not None and self.task is None and not self.done:
            self.run(self.session.check_timeout())

    def next_events(self) -> list | None:
        """The session's next events from input already here, or None when there is
        none or it must wait (the client is not reading, or it is closed)."""
        if self.done or self.out_paused or self.session.closed:
            return None
        if self.session.pending:
            return self.session.proceed()
        if self.backlog:
            data = self.backlog.pop(0)
            self.held -= len(data)
            return self.session.receive_data(data)
        return None

    def pump(self) -> None:
        """Feed the session what it may take now; read more only when it took all."""
        while self.task is None:
            events = self.next_events()
            if events is None:
                break
            self.run(events)
        if self.done or self.transport.is_closing():
            return
        if self.out_paused or self.held > HOLD_MAX:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # ---- output
    def pause_writing(self) -> None:
        # the client does not read: stop reading from it (no more replies pile up),
        # and drop it if that lasts the write time-out (qmail: timeoutsmtpd)
        self.out_paused = True
        self.transport.pause_reading()
        if self.write_timer is None:
            self.write_timer = self.loop.call_later(self.write_timeout, self._write_timed_out)

    def _write_timed_out(self) -> None:
        self.write_timer = None
        if self.w.o.verbose:
            log(f"session {self.id}: the client has not read for {self.write_timeout:g}s; "
                "dropped")
        self.transport.abort()

    def resume_writing(self) -> None:
        self.out_paused = False
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        if self.session is not None and not self.done:
            self.pump()

    # ---- the session's events
    def _plain(self, ev) -> bool | None:
        """Carry out a Reply, Log or Close event (None: it was Close); False for the
        events that must be awaited (queue, TLS, AUTH)."""
        kind = type(ev)
        if kind is E.Reply:
            self.transport.write(ev.data)
        elif kind is E.Log:
            log(ev.text)
        elif kind is E.Close:
            self.finish()
            return None
        else:
            return False
        return True

    def run(self, events: list) -> None:
        """Carry out the events; the queue's are awaited in a task, input held meanwhile."""
        while events:
            done = self._plain(events[0])
            if done is None:
                return
            if not done:
                self.task = self.loop.create_task(self.run_queue(events))
                return
            events.pop(0)
        if self.w.stopping and self.w.grace_over and self.session.idle():
            self.shutdown = True
            self.transport.write(R_SHUTDOWN)
            self.finish()
        # the read deadline (session.deadline) is watched by the worker's sweeper: one
        # timer for all sessions rather than one per command

    async def run_queue(self, events: list) -> None:
        try:
            await self._run_queue(events)
        except asyncio.CancelledError:
            raise
        except Exception as err:                 # a bug: this connection ends, not us
            log(f"session {self.ip} ended by {type(err).__name__}: {err}")
            if self.queue is not None:
                self.queue.kill()
                self.queue = None
            self.transport.abort()
        finally:
            self.task = None
        if not self.done:
            self.pump()

    async def _run_queue(self, events: list) -> None:
        try:
            while events:
                ev = events.pop(0)
                kind = type(ev)
                done = self._plain(ev)
                if done is None:
                    return
                if done:
                    pass
                elif kind is E.QueueData:
                    await self.queue.put(ev.data)
                elif kind is E.QueueOpen:
                    self.queue = AsyncQueue(self.program, self.w.o.qmail_dir, self.env)
                    events[:0] = self.session.queue_opened(await self.queue.start())
                elif kind is E.QueueClose:
                    status, failed = await self.queue.close(ev.envelope)
                    self.queue = None
                    events[:0] = self.session.queue_closed(status, failed)
                elif kind is E.QueueAbort:
                    if self.queue is not None:
                        queue, self.queue = self.queue, None
                        await queue.abort()
                elif kind is E.StartTls:
                    ctx = self.w.tls
                    self.switching = True
                    try:
                        self.transport = await self.loop.start_tls(
                            self.transport, self, ctx, server_side=True,
                            ssl_handshake_timeout=self.timeout)
                    except (TimeoutError, OSError, ValueError) as err:
                        log(f"TLS handshake with {self.ip} failed: {err}")
                        self.transport.abort()
                        return
                    finally:
                        self.switching = False
                    events[:0] = self.session.tls_started()
                elif kind is E.CheckPassword:
                    from .secure import check_async
                    code = await check_async(self.w.checkpw, ev.user, ev.password,
                                             self.w.checkpw_timeout, self.env)
                    events[:0] = self.session.auth_result(code)
                if not events:                  # the next input, in this same task
                    events = self.next_events() or []
        except asyncio.CancelledError:
            if self.queue is not None:          # the client is gone: qmail-queue too
                queue, self.queue = self.queue, None
                self.w.cleanup(queue.abort())
            raise

    def shut_down(self) -> None:
        """The grace period is over: 421 between commands, or after the reply owed."""
        if self.done or self.session is None:
            return
        if self.task is None and self.session.idle():
            self.shutdown = True
            self.transport.write(R_SHUTDOWN)
            self.finish()
        # a session in the middle of a command or a message gets its reply first, then
        # run() ends it


# The server's options: one table feeds argparse, --help and the README's table.
# (flag, attribute, type, default, metavar, help); "" or None: the help says what.
PARAMS: list[tuple[str, str, type, object, str, str]] = [
    ("--listen", "listen", str, None, "HOST:PORT",
     "listen on this address (0.0.0.0:25; [::]:25 for both families); without it, "
     "SMTP on fd 0/1 as under tcpserver"),
    ("--qmail-dir", "qmail_dir", str, None, "DIR",
     "qmail's home: control/ and bin/qmail-queue (default: $QMAIL_DIR, else /var/qmail)"),
    ("--rules", "rules", str, "", "CDB",
     "tcprules cdb, read as tcpserver -x reads it and re-read when it changes; missing "
     "or not a cdb: every connection is dropped (default: none, all allowed)"),
    ("--max-connections", "max_connections", int, 500, "N",
     "sessions in all, across the workers; past it: 421"),
    ("--max-per-ip", "max_per_ip", int, 20, "N",
     "sessions per client address, 0 for no limit; past it: 421"),
    ("--workers", "workers", int, 1, "N", "processes sharing the port (0: one per CPU)"),
    ("--user", "user", str, "", "NAME",
     "run as this account once the port is bound: its uid and gid, no other groups "
     "(default: stay as started, with a warning when that is root)"),
    ("--grace", "grace", float, 10.0, "SECONDS",
     "after SIGTERM, sessions have this long to finish; then 421 between commands"),
    ("--write-timeout", "write_timeout", float, 0.0, "SECONDS",
     "a client that leaves our replies unread this long is dropped "
     "(0: control/timeoutsmtpd, as in qmail)"),
    ("--local-name", "local_name", str, "", "NAME",
     "TCPLOCALHOST for sessions (default: control/me)"),
    ("--metrics", "metrics", str, "", "HOST:PORT",
     "serve Prometheus metrics at http://HOST:PORT/metrics (all workers summed)"),
    ("--checkpassword", "checkpassword", str, "", "'PROG ARGS'",
     "checkpassword program for AUTH (default: $CHECKPASSWORD; none: no AUTH)"),
]


class Options:
    def __init__(self) -> None:
        for _, attr, _, default, _, _ in PARAMS:
            setattr(self, attr, default)
        self.qmail_dir = os.environ.get("QMAIL_DIR") or "/var/qmail"
        self.verbose = True
        self.tls = None


def parser():
    import argparse

    from .. import __version__
    p = argparse.ArgumentParser(
        prog=PROG,
        description="qmail-smtpd with the validrcptto.cdb check: on fd 0/1 under "
        "tcpserver (no options needed), or as a long-running server with --listen.  "
        "Per-connection settings come from the environment as in qmail-smtpd "
        "(VALIDRCPTTO_CDB, VALIDRCPTTO_LIMIT, VALIDRCPTTO_LOG, RELAYCLIENT, DATABYTES, "
        "QMAILQUEUE, CHECKPASSWORD, TLS_CERT, ...: see the README).")
    for flag, attr, kind, default, metavar, text in PARAMS:
        if default not in (None, ""):
            text += f" (default: {default:g})" if kind is float else f" (default: {default})"
        p.add_argument(flag, dest=attr, type=kind, metavar=metavar, help=text)
    p.add_argument("--quiet", dest="verbose", action="store_false", default=None,
                   help="no ok/end/deny/busy line per connection (default: one each)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def parse_args(argv: list[str]) -> Options:
    """Options for either front end; argparse's exit 2 on a bad argument."""
    ns = parser().parse_args(argv)
    opts = Options()
    for name, value in vars(ns).items():
        if value is not None:
            setattr(opts, name, value)
    for flag, attr, kind, _, _, _ in PARAMS:
        if kind in (int, float) and getattr(opts, attr) < 0:
            parser().error(f"{flag} must not be negative")
    if opts.listen is not None:
        try:
            parse_listen(opts.listen)
        except ValueError as err:
            parser().error(f"--listen: {err}")
    if opts.workers == 0:
        opts.workers = os.cpu_count() or 1
    opts.qmail_dir = os.path.abspath(opts.qmail_dir)
    if opts.checkpassword:
        os.environ["CHECKPASSWORD"] = opts.checkpassword
    opts.max_connections = max(1, opts.max_connections)
    if not opts.local_name:
        try:
            from .controls import readline
            me = readline(os.path.join(opts.qmail_dir, "control", "me"))
            opts.local_name = me.decode("utf-8", "surrogateescape") if me else ""
        except ControlError:
            opts.local_name = ""
    return opts


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def bind(opts: Options, reuse_port: bool) -> socket.socket:
    from ..netsock import listen_tcp
    host, port = parse_listen(opts.listen)
    return listen_tcp(host, port, 1024, reuse_port=reuse_port)


def drop_privileges(user: str) -> None:
    import pwd
    pw = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)


async def serve(opts: Options, sock: socket.socket, limits: Limits, metrics: Metrics) -> None:
    loop = asyncio.get_running_loop()
    worker = Worker(opts, limits, metrics)
    warned = [0.0]

    def on_error(loop, context) -> None:        # one line, never a traceback
        msg = context.get("message", "")
        exc = context.get("exception")
        if "out of system resource" in msg:
            now = time.monotonic()
            if now - warned[0] > 60:
                warned[0] = now
                log(f"accept: {exc}; pausing accepts for a second (sessions go on)")
            return
        log(f"{msg}: {type(exc).__name__ if exc else ''} {exc or ''}".strip())
    loop.set_exception_handler(on_error)
    server = await loop.create_server(lambda: SmtpProtocol(worker), sock=sock)

    def sweep() -> None:                        # read deadlines, checked twice a second
        now = time.monotonic()
        for p in list(worker.sessions):
            if p.session is not None and p.session.deadline <= now:
                p.on_timeout()
        loop.call_later(SWEEP, sweep)
    loop.call_later(SWEEP, sweep)
    if worker.rules is not None:
        try:
            worker.rules_current()
        except OSError as err:
            log(f"{worker.rules_error(err)}; every connection is dropped until it is fixed")
    addr = sock.getsockname()
    log(f"listening on {addr[0]}:{addr[1]}")
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, worker.reload)
    await stop.wait()
    server.close()                              # no new connections
    worker.stopping = True
    log(f"SIGTERM: not accepting; {len(worker.sessions)} sessions have {opts.grace:g}s")
    deadline = loop.time() + opts.grace
    while worker.sessions and loop.time() < deadline:
        await asyncio.sleep(0.05)
    worker.grace_over = True
    for p in list(worker.sessions):
        p.shut_down()
    deadline = loop.time() + 30                  # sessions owed a reply after a message
    while worker.sessions and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for p in list(worker.sessions):
        p.transport.abort()
    await asyncio.sleep(0)                       # their connection_lost: tasks cancelled
    if worker.cleanups:
        await asyncio.wait(list(worker.cleanups), timeout=AsyncQueue.ABORT_WAIT + 1)
    for child in list(LIVE):                     # nothing is left behind unreaped
        child.kill()
    log("stopped")


def run_worker(opts: Options, sock: socket.socket, limits: Limits, metrics: Metrics) -> int:
    try:
        asyncio.run(serve(opts, sock, limits, metrics))
    except KeyboardInterrupt:
        pass
    return 0


def supervise_workers(opts: Options, socks: list[socket.socket], limits: Limits,
                      metrics: Metrics, httpd=None) -> int:
    """The parent of ``--workers N``: starts them (and, with --metrics, a process that
    serves /metrics: this one forks, so it runs no threads), restarts one that dies,
    passes SIGTERM and SIGHUP on, and exits 0 once all have stopped after SIGTERM."""
    children: dict[int, int] = {}                    # pid -> index of its socket (-1: metrics)
    stopping = [False]

    def start(i: int) -> None:
        pid = os.fork()
        if pid == 0:
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            if i == -1:
                for s in socks:
                    s.close()
                httpd.serve_forever()
                os._exit(0)
            for j, s in enumerate(socks):
                if j != i:
                    s.close()
            if httpd is not None:
                httpd.socket.close()
            limits.row = metrics.row = i
            os._exit(run_worker(opts, socks[i], limits, metrics))
        children[pid] = i

    def forward(sig, frame) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping[0] = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM if sig == signal.SIGINT else sig)
            except ProcessLookupError:
                pass
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for i in range(len(socks)):
        start(i)
    if httpd is not None:
        start(-1)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        i = children.pop(pid, None)
        if i is not None and i >= 0:
            limits.clear(i)                 # its sessions died with it
            metrics.retire(i)               # its counters stay counted
        if i is not None and not stopping[0]:
            what = "metrics server" if i == -1 else "worker"
            log(f"{what} {pid} ended ({status}); starting another")
            time.sleep(0.5)
            start(i)
    log("stopped")
    return 0


def main(opts: Options) -> None:
    if os.geteuid() == 0 and not opts.user:
        log("WARNING: running as root without --user: every session runs as root "
            "(give --user qmaild, or SMTPD_USER in the service's env)")
    try:
        socks = [bind(opts, opts.workers > 1) for _ in range(opts.workers)]
    except (OSError, ValueError) as err:
        sys.stderr.write(f"{PROG}: cannot listen on {opts.listen}: {err}\n")
        sys.exit(111)
    limits = Limits(opts.max_connections, opts.max_per_ip, opts.workers)
    metrics = Metrics(opts.workers)
    httpd = None
    if opts.metrics:
        try:
            from .metrics import bind as bind_metrics, server as metrics_server
            httpd = metrics_server(metrics, bind_metrics(opts.metrics))
        except (OSError, ValueError) as err:
            sys.stderr.write(f"{PROG}: cannot serve metrics on {opts.metrics}: {err}\n")
            sys.exit(111)
    # everything a session needs is loaded while we may still read it: after --user,
    # the Python installation (root's, often) may be out of reach
    import cdbx  # noqa: F401
    import concurrent.futures.thread  # noqa: F401
    import ssl  # noqa: F401
    from . import cdbfile, queue, secure, tcprules  # noqa: F401
    opts.tls = secure.tls_context(opts.qmail_dir, os.environ, log)
    if opts.user:
        try:
            drop_privileges(opts.user)
        except (KeyError, OSError) as err:
            sys.stderr.write(f"{PROG}: cannot become {opts.user}: {err}\n")
            sys.exit(111)
    if opts.workers == 1:
        if httpd is not None:
            import threading
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
        sys.exit(run_worker(opts, socks[0], limits, metrics))
    sys.exit(supervise_workers(opts, socks, limits, metrics, httpd))
