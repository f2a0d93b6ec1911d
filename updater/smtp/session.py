"""The qmail-smtpd conversation (netqmail 1.06 plus the validrcptto.cdb check) as an I/O-free state
machine, in the style of h11: bytes in, events out (``events``: the events, the states and the
contract a driver keeps). A driver feeds one read at a time and carries out every event before
it reads again, so the session holds at most one read plus one partial command line (4 KiB);
after BATCH command lines it stops with ``pending`` true until the driver calls ``proceed()``,
so a client that pipelines without reading gets at most about BATCH replies ahead. The controls,
the lookups, the clocks and the queue come from outside; ``check_timeout()`` turns a passed
``deadline`` into qmail's ``451 timeout``. DATA, the Received line and AUTH are imported when
first needed (``blast``, ``received``, ``sasl``)."""

from __future__ import annotations

from collections.abc import Callable       # (not typing: start-up counts here)

from ..textsafe import escape
from .addresses import addrparse, badmailfrom, rcpthosts_allows, validrcptto
from .events import (AUTH, CALLBACKS, Event, COMMAND, DATA, DONE, QUEUE_CLOSING, QUEUE_OPENING,
                     TLS_STARTING, Close, Log, ProtocolError, QueueAbort, QueueOpen, Reply,
                     StartTls, _READING, _READING_LINES)
from .params import BATCH, COMMAND_LINE_MAX, Controls, Lookup, Peer, Policy
from .replies import (R_BMF, R_HELP, R_MAILFIRST, R_MAXRCPT, R_NOGATEWAY, R_NOTVALID, R_QQT,
                      R_RCPTFIRST, R_SYNTAX, R_TIMEOUT, R_TLS_AGAIN, R_TLS_PIPELINED,
                      R_TLS_READY, R_TOOLONG, R_TOOMANY, R_UNIMPL)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any
    from .blast import DataDecoder


class Session:
    def __init__(self, controls: Controls, peer: Peer, policy: Policy | None = None, *,
                 validrcptto: Lookup | None = None, morercpthosts: Lookup | None = None,
                 ipme: Callable[[tuple[int, int, int, int]], bool] | None = None,
                 clock: Callable[[], float], monotonic: Callable[[], float] | None = None):
        self.c, self.peer, self.policy = controls, peer, policy or Policy()
        self.validrcptto, self.more, self.ipme, self.clock = validrcptto, morercpthosts, ipme, clock
        self.mono = monotonic or clock            # for deadlines; clock for dates
        self.remote = peer.remoteip.decode("latin-1")
        self.helo: bytes | None = None            # fakehelo: only when it differs
        self.seenmail = False
        self.flagbarf = False
        self.mailfrom = b""
        self.rcptto = bytearray()                 # "Taddr\0" ..., as qmail-queue wants
        self.nrcpt = 0
        self.invalid = 0
        self.buf = b""
        self.discarding = False                   # inside an over-long command line
        self.mode = COMMAND
        self.held = False                         # lines left for proceed()
        self.quit = False                         # QUIT ended it (qmail exits 0)
        self.data: DataDecoder | None = None
        self.rest = False                         # bytes follow the command line
        self.drop = False                         # ... and are refused
        self.size = 0
        self.qp = 0
        self.deadline = self.mono() + controls.timeout
        self.relay = peer.relayclient               # RELAYCLIENT, or b"" after AUTH
        self.tls = False
        self.user: bytes | None = None              # who authenticated
        self.auth_failures = 0
        self.auth_step: tuple[Any, ...] = ()        # ("plain",), ("user",), ("pass", u)
        # what happened, for the driver's metrics: "rcpt.accepted.validrcptto", ... -> n
        self.counts: dict[str, int] = {}
        self.end = ""                               # why it ended: quit, timeout, limit, error

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    @property
    def end_reason(self) -> str:
        """quit, timeout, limit (invalid recipients, AUTH failures), or error (anything
        else: the client went away, a bare LF, a write that failed)."""
        return "quit" if self.quit else self.end or "error"

    # ---- driver interface
    @property
    def closed(self) -> bool:
        return self.mode is DONE

    def _expect(self, callback: str) -> None:
        """A driver callback is legal only in the state that waits for it."""
        if self.mode is not CALLBACKS[callback]:
            raise ProtocolError(f"{callback}() while {self.mode.value}")

    def tls_started(self) -> list[Event]:
        """The handshake is done: everything known before it is forgotten (RFC 3207)."""
        self._expect("tls_started")
        self.tls = True
        self.count("tls")
        self.helo = None
        self.seenmail = False
        self.rcptto = bytearray()
        self.mailfrom = b""
        self.mode = COMMAND
        self.buf = b""
        self.deadline = self.mono() + self.c.timeout
        return []

    def auth_result(self, code: int | None) -> list[Event]:
        """The checkpassword program's exit code (None: it hung or could not run)."""
        self._expect("auth_result")
        from .sasl import result
        ev = result(self, code)
        if self.mode is not DONE:
            self.deadline = self.mono() + self.c.timeout
            self._run(ev)
        return ev

    @property
    def pending(self) -> bool:
        """Whole command lines are waiting for ``proceed()`` (the last call stopped
        after BATCH of them)."""
        return self.held and self.mode in _READING_LINES

    def proceed(self) -> list[Event]:
        """The next batch of the command lines already received."""
        ev: list[Event] = []
        if self.pending:
            self._run(ev)
        return ev

    def idle(self) -> bool:
        """Between commands: every reply owed has been given, no command half read, no
        message in progress (a server shutting down may say 421 now)."""
        return self.mode is COMMAND and not self.buf and not self.discarding

    def start(self) -> list[Event]:
        return [Reply(b"220 " + self.c.greeting + b" ESMTP\r\n")]

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed client bytes; ``b""`` means the client closed its side."""
        if self.mode is DONE:
            return []
        self.deadline = self.mono() + self.c.timeout
        ev: list[Event] = []
        if not data:
            if self.mode is DATA or self.mode is QUEUE_CLOSING:
                ev.append(QueueAbort())
            self.mode = DONE
            ev.append(Close())
            return ev
        self.buf += data
        self._run(ev)
        return ev

    def check_timeout(self) -> list[Event]:
        """The read deadline passed (per the clock): ``451 timeout`` and close."""
        if self.mode not in _READING or self.mono() < self.deadline:
            return []
        ev: list[Event] = []
        if self.mode is DATA:
            ev.append(QueueAbort())
        self.mode = DONE
        self.end = "timeout"
        ev += [Reply(R_TIMEOUT), Close()]
        return ev

    def queue_opened(self, qp: int | None) -> list[Event]:
        self._expect("queue_opened")
        if qp is None:
            self.mode = COMMAND
            self.count("message.tempfail")
            ev: list[Event] = [Reply(R_QQT)]
        else:
            from .blast import start              # (imported when a message starts)
            ev = start(self, qp)
        self.deadline = self.mono() + self.c.timeout
        self._run(ev)
        return ev

    def queue_closed(self, status: int | None, write_failed: bool = False) -> list[Event]:
        self._expect("queue_closed")
        from .blast import finish
        ev: list[Event] = [Reply(finish(self, status, write_failed))]
        self.deadline = self.mono() + self.c.timeout
        self._run(ev)
        return ev

    # ---- the machine
    def _run(self, ev: list[Event]) -> None:
        while self.buf and self.mode in _READING:
            if self.mode is DATA:
                self._data(ev)
                continue
            buf, pos, n = self.buf, 0, len(self.buf)
            lines = 0
            self.held = False
            while pos < n and self.mode in _READING_LINES:
                if lines == BATCH:
                    self.held = True
                    break
                lines += 1
                nl = buf.find(b"\n", pos)
                if self.discarding:                      # the rest of an over-long line
                    if nl == -1:
                        pos = n
                        break
                    pos, self.discarding = nl + 1, False
                    ev.append(Reply(R_TOOLONG))
                    continue
                if nl == -1:
                    if n - pos > COMMAND_LINE_MAX:
                        pos, self.discarding = n, True
                    break
                if nl - pos > COMMAND_LINE_MAX:
                    pos = nl + 1
                    ev.append(Reply(R_TOOLONG))
                    continue
                line, pos = buf[pos:nl], nl + 1
                if self.mode is AUTH:
                    self._auth_line(line, ev)
                    continue
                self.rest = pos < n
                self._command(line, ev)
                if self.drop:                            # what followed STARTTLS
                    self.drop, pos = False, n
                elif self.mode is TLS_STARTING:
                    self.buf = b""
                    return
            if self.mode is DONE:
                return
            self.buf = buf[pos:]
            if self.mode in _READING_LINES:
                return                                   # no complete line left

    def _data(self, ev: list[Event]) -> None:
        from .blast import absorb
        absorb(self, ev)

    def _command(self, line: bytes, ev: list[Event]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        nul = line.find(b"\0")
        if nul != -1:                                  # C strings end at the NUL
            line = line[:nul]
        sp = line.find(b" ")
        if sp == -1:
            verb, arg = line, b""
        else:
            verb, arg = line[:sp], line[sp:].lstrip(b" ")
        handler = _COMMANDS.get(verb.lower())
        if handler is None:
            ev.append(Reply(R_UNIMPL))
        else:
            handler(self, arg, ev)

    def _greet(self, code: bytes) -> bytes:
        return code + self.c.greeting

    def smtp_helo(self, arg: bytes, ev: list[Event]) -> None:
        ev.append(Reply(self._greet(b"250 ") + b"\r\n"))
        self._dohelo(arg)

    def smtp_ehlo(self, arg: bytes, ev: list[Event]) -> None:
        lines = [self._greet(b""), b"PIPELINING", b"8BITMIME"]
        if self.policy.tls and not self.tls:
            lines.append(b"STARTTLS")
        if self.auth_offered():
            lines += [b"AUTH LOGIN PLAIN", b"AUTH=LOGIN PLAIN"]
        ev.append(Reply(b"".join(b"250-" + x + b"\r\n" for x in lines[:-1]) +
                        b"250 " + lines[-1] + b"\r\n"))
        self._dohelo(arg)

    def auth_offered(self) -> bool:
        return self.policy.auth and (self.tls or self.policy.auth_plaintext)

    def smtp_starttls(self, arg: bytes, ev: list[Event]) -> None:
        if self.tls:
            ev.append(Reply(R_TLS_AGAIN))
        elif not self.policy.tls:
            ev.append(Reply(R_UNIMPL))
        elif self.rest:                    # bytes after STARTTLS: refused (RFC 3207)
            ev.append(Reply(R_TLS_PIPELINED))
            self.drop = True
        else:
            ev += [Reply(R_TLS_READY), StartTls()]
            self.mode = TLS_STARTING

    def smtp_auth(self, arg: bytes, ev: list[Event]) -> None:
        from .sasl import command                 # (imported when AUTH starts)
        command(self, arg, ev)

    def _auth_line(self, line: bytes, ev: list[Event]) -> None:
        from .sasl import response
        response(self, line, ev)

    def _dohelo(self, arg: bytes) -> None:
        self.seenmail = False
        self.helo = arg if arg.lower() != self.peer.remotehost.lower() else None

    def smtp_quit(self, arg: bytes, ev: list[Event]) -> None:
        ev += [Reply(self._greet(b"221 ") + b"\r\n"), Close()]
        self.mode = DONE
        self.quit = True
        self.buf = b""

    def smtp_rset(self, arg: bytes, ev: list[Event]) -> None:
        self.seenmail = False
        ev.append(Reply(b"250 flushed\r\n"))

    def smtp_noop(self, arg: bytes, ev: list[Event]) -> None:
        ev.append(Reply(b"250 ok\r\n"))

    def smtp_vrfy(self, arg: bytes, ev: list[Event]) -> None:
        ev.append(Reply(b"252 send some mail, i'll try my best\r\n"))

    def smtp_help(self, arg: bytes, ev: list[Event]) -> None:
        ev.append(Reply(R_HELP))

    def _addr(self, arg: bytes) -> bytes | None:
        return addrparse(arg, self.c.liphost, self.ipme)

    def smtp_mail(self, arg: bytes, ev: list[Event]) -> None:
        addr = self._addr(arg)
        if addr is None:
            ev.append(Reply(R_SYNTAX))
            return
        self.flagbarf = badmailfrom(addr, self.c.badmailfrom)
        self.seenmail = True
        self.rcptto = bytearray()
        self.nrcpt = 0
        self.mailfrom = addr
        ev.append(Reply(b"250 ok\r\n"))

    def smtp_rcpt(self, arg: bytes, ev: list[Event]) -> None:
        if not self.seenmail:
            self.count("rcpt.rejected.syntax")
            ev.append(Reply(R_MAILFIRST))
            return
        addr = self._addr(arg)
        if addr is None:
            self.count("rcpt.rejected.syntax")
            ev.append(Reply(R_SYNTAX))
            return
        if self.flagbarf:
            self.count("rcpt.rejected.badmailfrom")
            ev.append(Reply(R_BMF))
            return
        relay = self.relay
        if relay is not None:
            addr += relay
            why = "auth" if self.user is not None else "relayclient"
        else:
            if not rcpthosts_allows(addr, self.c.rcpthosts, self.more):
                self.count("rcpt.rejected.rcpthosts")
                ev += [Log(self._vlog("not in rcpthosts: " +  # the domain only
                                      escape(addr[addr.rfind(b"@") + 1:]))), Reply(R_NOGATEWAY)]
                return
            why = "rcpthosts" if self.validrcptto is None else "validrcptto"
            ok = True
            if self.validrcptto is not None:
                ok, logs = validrcptto(self.validrcptto, addr, self.policy.loglevel)
                ev += [Log(self._vlog(text)) for text in logs]
            if not ok:
                self.invalid += 1
                self.count("rcpt.rejected.validrcptto")
                limit = self.policy.limit
                if limit and self.invalid >= limit:
                    self.count("hangup.invalid_limit")
                    self.end = "limit"
                    ev += [Log(self._vlog("excessive violations, hanging up")),
                           Reply(R_TOOMANY), Close()]
                    self.mode = DONE
                    self.buf = b""
                    return
                ev.append(Reply(R_NOTVALID))
                return
        if self.policy.maxrcpt and self.nrcpt >= self.policy.maxrcpt:
            self.count("rcpt.rejected.maxrcpt")
            ev.append(Reply(R_MAXRCPT))
            return
        self.count("rcpt.accepted." + why)
        self.rcptto += b"T" + addr + b"\0"
        self.nrcpt += 1
        ev.append(Reply(b"250 ok\r\n"))

    def _vlog(self, text: str) -> str:
        return f"validrcptto [{self.remote}] {text}"

    def smtp_data(self, arg: bytes, ev: list[Event]) -> None:
        if not self.seenmail:
            ev.append(Reply(R_MAILFIRST))
            return
        if not self.rcptto:
            ev.append(Reply(R_RCPTFIRST))
            return
        self.seenmail = False
        self.mode = QUEUE_OPENING
        ev.append(QueueOpen())


_COMMANDS = {
    b"rcpt": Session.smtp_rcpt, b"mail": Session.smtp_mail, b"data": Session.smtp_data,
    b"quit": Session.smtp_quit, b"helo": Session.smtp_helo, b"ehlo": Session.smtp_ehlo,
    b"rset": Session.smtp_rset, b"help": Session.smtp_help, b"noop": Session.smtp_noop,
    b"vrfy": Session.smtp_vrfy, b"starttls": Session.smtp_starttls, b"auth": Session.smtp_auth,
}


