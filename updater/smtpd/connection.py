"""One --listen connection: the session's events carried out on an asyncio transport
(tcpserver's rules and environment, qmail-smtpd's set-up, back-pressure, time-outs,
qmail-queue, STARTTLS and AUTH awaited in a task)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from ..limits import HOLD_MAX
from ..serving.controlfiles import ControlError
from ..smtp import events as E
from ..smtp.events import Event
from ..smtp.replies import R_CONTROLS, R_SHUTDOWN, Refusal
from .controls import open_session, queue_program
from .host import Host
from .prog import log
from .queue import AsyncQueue
from .tcprules import lookup, relays

if TYPE_CHECKING:
    from ..smtp.session import Session



class SmtpProtocol(asyncio.Protocol):
    """One connection: the session's events carried out on an asyncio transport.

    Input the session has not taken yet (while a queue or AUTH step is awaited, or
    while the client is not taking our replies) waits in ``backlog``.  Reading stops
    while the client is not taking our replies (``out_paused``, from the transport's
    write high-water mark) and while more than HOLD_MAX bytes wait; it goes on
    otherwise, so a client hanging up is noticed at once, even during AUTH or while
    qmail-queue works.  So one session holds at most: HOLD_MAX plus one read of
    input, the transport's write buffer, and one batch of replies (limits.SMTP_BATCH
    lines)."""

    def __init__(self, worker: Host):
        self.w = worker
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None            # asyncio's, then the TLS one after STARTTLS
        self.session: Session | None = None   # once connection_made admits it
        self.write_timer: asyncio.TimerHandle | None = None
        self.queue: AsyncQueue | None = None
        self.backlog: list[bytes] = []        # input the session has not taken yet
        self.held = 0                         # bytes in backlog
        self.task: asyncio.Task[None] | None = None
        self.paused: asyncio.TimerHandle | None = None     # the tarpit's wait
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
    def connection_made(self, transport: Any) -> None:
        try:
            self._connection_made(transport)
        except Exception as err:                 # a bug: this connection ends, not us
            log(f"session {self.ip} ended by {type(err).__name__}: {err}")
            transport.abort()

    def _connection_made(self, transport: Any) -> None:
        w = self.w
        self.transport = transport
        self.id = w.next_id()
        peer = transport.get_extra_info("peername") or ("unknown", 0)
        local = transport.get_extra_info("sockname") or ("unknown", 0)
        self.ip = ip = peer[0][7:] if peer[0].startswith("::ffff:") and "." in peer[0] \
            else peer[0]
        where = f"{local[0]}:{local[1]} {ip}:{peer[1]}"
        admitted, rule = self._admit(ip, where)
        if not admitted:
            return
        self.counted = True
        self.started = time.monotonic()
        w.opened(self)
        self.env = env = self._environment(ip, peer, local, rule)
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
        self.session = open_session(controls, env, cdb, more, w.ipme, tls=w.tls is not None,
                                    auth=w.checkpw is not None)
        self.program = queue_program(env, w.o.qmail_dir)
        self.run(self.session.start())

    def _admit(self, ip: str, where: str) -> tuple[bool, Any]:
        """tcpserver's rules, then the limits: (admitted, the rule that matched)."""
        w, transport = self.w, self.transport
        rule = None
        if w.rules is not None:
            try:
                rule = lookup(w.rules_current(), ip)
            except OSError as err:           # tcpserver drops the connection, and logs
                w.metrics.add("connections_refused.rules")
                w.rules_failed(err, self.id, where)
                transport.abort()
                return False, None
            if not rule.allow:
                w.metrics.add("connections_refused.rules")
                if w.o.verbose:
                    log(f"deny {self.id} {where}")
                transport.abort()
                return False, None
        refusal, why = w.limits.take(ip, relays(rule, w.base_env), time.time())
        if refusal is not None:
            w.metrics.add("connections_refused." + why)
            if w.o.verbose:
                log(f"{'harvester' if why == 'harvest' else 'busy'} {self.id} {where}")
            transport.write(refusal)
            transport.close()
            return False, None
        return True, rule

    def _environment(self, ip: str, peer: Any, local: Any, rule: Any) -> dict[str, str]:
        """The environment tcpserver gives qmail-smtpd (and so qmail-queue and
        checkpassword): its own, PROTO and the TCP* variables, then the rule's."""
        env = dict(self.w.base_env)
        env.update(PROTO="TCP", TCPREMOTEIP=ip, TCPREMOTEPORT=str(peer[1]),
                   TCPLOCALIP=local[0], TCPLOCALPORT=str(local[1]))
        if self.w.o.local_name:
            env["TCPLOCALHOST"] = self.w.o.local_name
        if rule is not None:
            for k, v in rule.env.items():
                if v is None:
                    env.pop(k, None)
                else:
                    env[k] = v
        return env

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.backlog.clear()
        self.held = 0
        self._cancel_timers()
        if self.paused is not None:
            self.paused.cancel()
            self.paused = None
        if self.task is not None and not self.task.done():
            self.task.cancel()                   # its handlers kill what it started
        elif self.queue is not None:             # between two reads of a message
            self.w.cleanup(self.queue.abort())
            self.queue = None
        if self.counted:
            self.counted = False
            self.w.limits.give(self.ip)
            self.w.closed(self)
            m = self.w.metrics
            if self.session is not None:
                self._harvested(self.session.counts)
                m.session_ended(self.session.counts,
                                "shutdown" if self.shutdown else self.session.end_reason,
                                time.monotonic() - self.started)
            if self.w.o.verbose:
                ok = self.session is not None and self.session.quit
                log(f"end {self.id} status {0 if ok else 1}")

    def _harvested(self, counts: dict[str, int]) -> None:
        """This session's refused recipients, counted against its client's address."""
        line = self.w.limits.refused(self.ip, counts.get(Refusal.VALIDRCPTTO.counter, 0),
                                     time.time())
        if line:
            self.w.metrics.add("harvesters_held")
            log(line)

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

    def eof_received(self) -> bool:
        if self.session is not None and not self.done:
            self.backlog.append(b"")
            self.pump()
        return False

    def on_timeout(self) -> None:
        if self.session is not None and not self.busy() and not self.done:
            self.run(self.session.check_timeout())

    def busy(self) -> bool:
        """Carrying something out (a queue, TLS, AUTH task, or the tarpit's wait)."""
        return self.task is not None or self.paused is not None

    def next_events(self) -> list[Event] | None:
        """The session's next events from input already here, or None when there is
        none or it must wait (the client is not reading, or it is closed)."""
        session = self.session
        if self.done or self.out_paused or session is None or session.closed:
            return None
        if session.pending:
            return session.proceed()
        if self.backlog:
            data = self.backlog.pop(0)
            self.held -= len(data)
            return session.receive_data(data)
        return None

    def pump(self) -> None:
        """Feed the session what it may take now; read more only when it took all."""
        while not self.busy():
            events = self.next_events()
            if events is None:
                break
            self.run(events)
        if self.done or self.transport.is_closing():
            return
        if self.out_paused or self.held > HOLD_MAX or self.paused is not None:
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
    def _plain(self, ev: Event) -> bool | None:
        """Carry out a Reply, Log or Close event (None: it was Close); False for the
        events that must be awaited (queue, TLS, AUTH)."""
        if isinstance(ev, E.Reply):
            self.transport.write(ev.data)
        elif isinstance(ev, E.Log):
            log(ev.text)
        elif isinstance(ev, E.Close):
            self.finish()
            return None
        else:
            return False
        return True

    def run(self, events: list[Event]) -> None:
        """Carry out the events; the queue's are awaited in a task, input held meanwhile."""
        while events:
            pause = events[0]
            if isinstance(pause, E.Pause):          # a timer, no task: as cheap as idle
                events.pop(0)
                self.transport.pause_reading()
                self.paused = self.loop.call_later(pause.seconds, self._unpause, events)
                return
            done = self._plain(events[0])
            if done is None:
                return
            if not done:
                self.task = self.loop.create_task(self.run_queue(events))
                return
            events.pop(0)
        if self.w.stopping and self.w.grace_over and self.session is not None and \
                self.session.idle():
            self.shutdown = True
            self.transport.write(R_SHUTDOWN)
            self.finish()
        # the read deadline (session.deadline) is watched by the worker's sweeper: one
        # timer for all sessions rather than one per command

    def _unpause(self, events: list[Event]) -> None:
        self.paused = None
        if not self.done:
            self.run(events)
            if not self.done and not self.busy():
                self.pump()

    async def run_queue(self, events: list[Event]) -> None:
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

    async def _run_queue(self, events: list[Event]) -> None:
        try:
            while events:
                ev = events.pop(0)
                done = self._plain(ev)
                if done is None:
                    return
                if not done:
                    answer = await self._awaited(ev)
                    if answer is None:
                        return
                    events[:0] = answer
                if not events:                  # the next input, in this same task
                    events = self.next_events() or []
        except asyncio.CancelledError:
            if self.queue is not None:          # the client is gone: qmail-queue too
                queue, self.queue = self.queue, None
                self.w.cleanup(queue.abort())
            raise

    async def _awaited(self, ev: Event) -> list[Event] | None:
        """A queue, TLS or AUTH event carried out; the session's answer to it (None:
        the connection is gone)."""
        session = self.session
        assert session is not None                  # (admitted before any event)
        if isinstance(ev, E.QueueData):
            assert self.queue is not None
            await self.queue.put(ev.data)
        elif isinstance(ev, E.QueueOpen):
            self.queue = AsyncQueue(self.program, self.w.o.qmail_dir, self.env)
            return session.queue_opened(await self.queue.start())
        elif isinstance(ev, E.QueueClose):
            assert self.queue is not None
            status, failed = await self.queue.close(ev.envelope)
            self.queue = None
            return session.queue_closed(status, failed)
        elif isinstance(ev, E.QueueAbort):
            if self.queue is not None:
                queue, self.queue = self.queue, None
                await queue.abort()
        elif isinstance(ev, E.StartTls):
            assert self.w.tls is not None
            self.switching = True
            try:
                self.transport = await self.loop.start_tls(
                    self.transport, self, self.w.tls, server_side=True,
                    ssl_handshake_timeout=self.timeout)
            except (TimeoutError, OSError, ValueError) as err:
                log(f"TLS handshake with {self.ip} failed: {err}")
                self.transport.abort()
                return None
            finally:
                self.switching = False
            return session.tls_started()
        elif isinstance(ev, E.Pause):              # a refusal after a message, say
            await asyncio.sleep(ev.seconds)
        elif isinstance(ev, E.CheckPassword):
            from .secure import check_async
            assert self.w.checkpw is not None
            code = await check_async(self.w.checkpw, ev.user, ev.password,
                                     self.w.checkpw_timeout, self.env)
            return session.auth_result(code)
        return []

    def shut_down(self) -> None:
        """The grace period is over: 421 between commands, or after the reply owed."""
        if self.done or self.session is None:
            return
        if not self.busy() and self.session.idle():
            self.shutdown = True
            self.transport.write(R_SHUTDOWN)
            self.finish()
        # a session in the middle of a command or a message gets its reply first, then
        # run() ends it


# The server's options: one table feeds argparse, --help and the README's table.
# (flag, attribute, type, default, metavar, help); "" or None: the help says what.
