"""The qmail-smtpd conversation (netqmail 1.06 plus the validrcptto.cdb check) as an
I/O-free state machine, in the style of h11: bytes in, events out (``events``: the
events and the contract a driver keeps).

A driver feeds one read at a time and carries out every event before it reads again:
so the session never holds more than one read plus one partial command line (4 KiB) of
client input.  The replies one call may produce are bounded too: after BATCH command
lines the session stops and ``pending`` is true; the driver calls ``proceed()`` for the
next batch once the client has taken the replies so far (a client that sends commands
but never reads cannot make the server hold more than about BATCH replies of output
beyond its transport buffer).

Nothing here touches a socket, a file, a process or the clock: the controls, the
lookups (rcpthosts' cdb, validrcptto.cdb, "is this IP mine") and ``clock`` are given to
the constructor (``clock`` for dates, ``monotonic`` for the read deadline).
``deadline`` is when the session's input times out; ``check_timeout()`` turns an expired
one into qmail's ``451 timeout``.  Write time-outs belong to the driver (qmail just
exits).  The DATA decoder, the Received line and AUTH are imported when first needed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable       # (not typing: start-up counts here)
from typing import TYPE_CHECKING

from ..checker import check, lower
from ..textsafe import escape
from .addresses import addrparse, badmailfrom, rcpthosts_allows
from .events import (CheckPassword, Close, Log, ProtocolError, QueueAbort, QueueClose,
                     QueueData, QueueOpen, Reply, StartTls)
from .params import BATCH, COMMAND_LINE_MAX, MAXHOPS, TRY_LOG_MAX, Controls, Peer, Policy
from .replies import (R_AUTH_AGAIN, R_AUTH_BAD, R_AUTH_CANCELLED, R_AUTH_INMAIL,
                      R_AUTH_MALFORMED, R_AUTH_NEEDTLS, R_AUTH_OK, R_AUTH_TEMP, R_AUTH_TOOMANY,
                      R_AUTH_TYPE, R_BMF, R_HELP, R_HOPS, R_MAILFIRST, R_MAXRCPT, R_NOGATEWAY,
                      R_NOTVALID, R_QQT, R_RCPTFIRST, R_SIZE, R_STRAYLF, R_SYNTAX, R_TIMEOUT,
                      R_TLS_AGAIN, R_TLS_PIPELINED, R_TLS_READY, R_TOOLONG, R_TOOMANY,
                      R_UNIMPL, qq_reply)

if TYPE_CHECKING:
    from .blast import DataDecoder


class State(enum.Enum):
    COMMAND = "reading commands"
    AUTH = "reading an AUTH response"
    DATA = "reading the message"
    QUEUE_OPENING = "waiting for queue_opened()"
    QUEUE_CLOSING = "waiting for queue_closed()"
    CHECKING_PASSWORD = "waiting for auth_result()"
    TLS_STARTING = "waiting for tls_started()"
    DONE = "closed"


(COMMAND, AUTH, DATA, QUEUE_OPENING, QUEUE_CLOSING, CHECKING_PASSWORD, TLS_STARTING,
 DONE) = State
_READING_LINES = (COMMAND, AUTH)
_READING = (COMMAND, DATA, AUTH)

# which driver callback is legal in which state (any other call raises ProtocolError)
CALLBACKS = {"queue_opened": QUEUE_OPENING, "queue_closed": QUEUE_CLOSING,
             "auth_result": CHECKING_PASSWORD, "tls_started": TLS_STARTING}


class Session:
    def __init__(self, controls: Controls, peer: Peer, policy: Policy | None = None, *,
                 validrcptto: Callable[[bytes], bytes | None] | None = None,
                 morercpthosts: Callable[[bytes], bytes | None] | None = None,
                 ipme: Callable[[tuple[int, int, int, int]], bool] | None = None,
                 clock: Callable[[], float], monotonic: Callable[[], float] | None = None):
        self.c, self.peer, self.policy = controls, peer, policy or Policy()
        self.validrcptto, self.more, self.ipme, self.clock = \
            validrcptto, morercpthosts, ipme, clock
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
        self.auth_step: tuple = ()                  # ("plain",), ("user",), ("pass", u)
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

    def tls_started(self) -> list:
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

    def auth_result(self, code: int | None) -> list:
        """The checkpassword program's exit code (None: it hung or could not run)."""
        self._expect("auth_result")
        ev: list = []
        user, self.auth_step = self.auth_step[1], ()
        self.mode = COMMAND
        who = escape(user, 64)
        self.count("auth.ok" if code == 0 else "auth.failed" if code == 1 else "auth.tempfail")
        if code == 0:
            self.user = user
            self.relay = b""
            ev += [Log(f"AUTH ok user {who} [{self.remote}]"), Reply(R_AUTH_OK)]
        elif code == 1:
            self.auth_failures += 1
            ev.append(Log(f"AUTH failed user {who} [{self.remote}]"))
            if self.auth_failures >= self.policy.auth_failures:
                self.count("hangup.auth_failures")
                self.end = "limit"
                ev += [Log(f"AUTH too many authentication failures [{self.remote}], "
                           "hanging up"), Reply(R_AUTH_TOOMANY), Close()]
                self.mode = DONE
                self.buf = b""
                return ev
            ev.append(Reply(R_AUTH_BAD))
        else:
            ev += [Log(f"AUTH temporary failure user {who} [{self.remote}]: "
                       f"{'no answer' if code is None else f'exit {code}'}"),
                   Reply(R_AUTH_TEMP)]
        self.deadline = self.mono() + self.c.timeout
        self._run(ev)
        return ev

    @property
    def pending(self) -> bool:
        """Whole command lines are waiting for ``proceed()`` (the last call stopped
        after BATCH of them)."""
        return self.held and self.mode in _READING_LINES

    def proceed(self) -> list:
        """The next batch of the command lines already received."""
        ev: list = []
        if self.pending:
            self._run(ev)
        return ev

    def idle(self) -> bool:
        """Between commands: every reply owed has been given, no command half read, no
        message in progress (a server shutting down may say 421 now)."""
        return self.mode is COMMAND and not self.buf and not self.discarding

    def start(self) -> list:
        return [Reply(b"220 " + self.c.greeting + b" ESMTP\r\n")]

    def receive_data(self, data: bytes) -> list:
        """Feed client bytes; ``b""`` means the client closed its side."""
        if self.mode is DONE:
            return []
        self.deadline = self.mono() + self.c.timeout
        ev: list = []
        if not data:
            if self.mode is DATA or self.mode is QUEUE_CLOSING:
                ev.append(QueueAbort())
            self.mode = DONE
            ev.append(Close())
            return ev
        self.buf += data
        self._run(ev)
        return ev

    def check_timeout(self) -> list:
        """The read deadline passed (per the clock): ``451 timeout`` and close."""
        if self.mode not in _READING or self.mono() < self.deadline:
            return []
        ev: list = []
        if self.mode is DATA:
            ev.append(QueueAbort())
        self.mode = DONE
        self.end = "timeout"
        ev += [Reply(R_TIMEOUT), Close()]
        return ev

    def queue_opened(self, qp: int | None) -> list:
        self._expect("queue_opened")
        ev: list = []
        if qp is None:
            self.mode = COMMAND
            self.count("message.tempfail")
            ev.append(Reply(R_QQT))
        else:
            self.qp = qp
            from .blast import DataDecoder        # (imported when a message starts)
            from .received import received_line
            self.mode = DATA
            self.data = DataDecoder()
            self.size = 0
            ev.append(Reply(b"354 go ahead\r\n"))
            p = self.peer
            proto = b"SMTP" if not (self.tls or self.user) else \
                b"ESMTP" + (b"S" if self.tls else b"") + (b"A" if self.user else b"")
            ev.append(QueueData(received_line(p.local, p.remoteip, p.remotehost,
                                              p.remoteinfo, self.helo, self.clock(), proto)))
        self.deadline = self.mono() + self.c.timeout
        self._run(ev)
        return ev

    def queue_closed(self, status: int | None, write_failed: bool = False) -> list:
        self._expect("queue_closed")
        d = self.data
        assert d is not None
        hops = d.hops >= MAXHOPS
        overflow = bool(self.c.databytes) and self.size > self.c.databytes
        self.data = None
        self.mode = COMMAND
        reply = qq_reply(status, write_failed or hops or overflow)
        if reply is None:
            reply = b"250 ok %d qp %d\r\n" % (int(self.clock()), self.qp)
        elif hops:
            reply = R_HOPS
        elif overflow:
            reply = R_SIZE
        self.count("message.queued" if reply.startswith(b"250") else
                   "message.rejected" if reply.startswith(b"5") else "message.tempfail")
        self.count("bytes", self.size)
        ev: list = [Reply(reply)]
        self.deadline = self.mono() + self.c.timeout
        self._run(ev)
        return ev

    # ---- the machine
    def _run(self, ev: list) -> None:
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

    def _data(self, ev: list) -> None:
        d = self.data
        assert d is not None
        pieces, used, end = d.feed(self.buf)
        self.buf = self.buf[used:]
        limit = self.c.databytes
        for piece in pieces:
            if not piece:
                continue
            before = self.size
            self.size += len(piece)
            if limit and self.size > limit:
                if before < limit:
                    ev.append(QueueData(piece[:limit - before]))
            else:
                ev.append(QueueData(piece))
        if end is False:
            self.end = "error"
            self.count("message.rejected")
            ev += [QueueAbort(), Reply(R_STRAYLF), Close()]
            self.mode = DONE
            self.buf = b""
        elif end:
            hops = d.hops >= MAXHOPS
            overflow = bool(limit) and self.size > limit
            envelope = None if hops or overflow else \
                b"F" + self.mailfrom + b"\0" + bytes(self.rcptto) + b"\0"
            ev.append(QueueClose(envelope))
            self.mode = QUEUE_CLOSING

    def _command(self, line: bytes, ev: list) -> None:
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

    def smtp_helo(self, arg: bytes, ev: list) -> None:
        ev.append(Reply(self._greet(b"250 ") + b"\r\n"))
        self._dohelo(arg)

    def smtp_ehlo(self, arg: bytes, ev: list) -> None:
        lines = [self._greet(b""), b"PIPELINING", b"8BITMIME"]
        if self.policy.tls and not self.tls:
            lines.append(b"STARTTLS")
        if self._auth_offered():
            lines += [b"AUTH LOGIN PLAIN", b"AUTH=LOGIN PLAIN"]
        ev.append(Reply(b"".join(b"250-" + x + b"\r\n" for x in lines[:-1]) +
                        b"250 " + lines[-1] + b"\r\n"))
        self._dohelo(arg)

    def _auth_offered(self) -> bool:
        return self.policy.auth and (self.tls or self.policy.auth_plaintext)

    def smtp_starttls(self, arg: bytes, ev: list) -> None:
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

    def smtp_auth(self, arg: bytes, ev: list) -> None:
        if not self.policy.auth:
            ev.append(Reply(R_UNIMPL))
            return
        if not self._auth_offered():
            ev.append(Reply(R_AUTH_NEEDTLS))
            return
        if self.user is not None:
            ev.append(Reply(R_AUTH_AGAIN))
            return
        if self.seenmail:
            ev.append(Reply(R_AUTH_INMAIL))
            return
        from . import sasl                        # (imported when AUTH starts)
        mech, _, initial = arg.partition(b" ")
        mech, initial = mech.lower(), initial.strip()
        if mech == b"plain":
            if initial:
                self._auth_plain(initial, ev)
            else:
                self.auth_step, self.mode = ("plain",), AUTH
                ev.append(Reply(sasl.PROMPT_PLAIN))
        elif mech == b"login":
            if initial:
                self._auth_login_user(initial, ev)
            else:
                self.auth_step, self.mode = ("user",), AUTH
                ev.append(Reply(sasl.PROMPT_USER))
        else:
            ev.append(Reply(R_AUTH_TYPE))

    def _auth_line(self, line: bytes, ev: list) -> None:
        line = line.rstrip(b"\r").strip()
        step, self.mode = self.auth_step, COMMAND
        if line == b"*":
            self.auth_step = ()
            ev.append(Reply(R_AUTH_CANCELLED))
        elif step[0] == "plain":
            self._auth_plain(line, ev)
        elif step[0] == "user":
            self._auth_login_user(line, ev)
        else:
            from .sasl import b64
            password = b64(line)
            if password is None:
                self.auth_step = ()
                ev.append(Reply(R_AUTH_MALFORMED))
            else:
                self._check(step[1], password, ev)

    def _auth_plain(self, data: bytes, ev: list) -> None:
        from .sasl import plain
        got = plain(data)
        if got is None:
            self.auth_step = ()
            ev.append(Reply(R_AUTH_MALFORMED))
            return
        self._check(got[0], got[1], ev)

    def _auth_login_user(self, data: bytes, ev: list) -> None:
        from .sasl import PROMPT_PASSWORD, b64
        user = b64(data)
        if not user:
            self.auth_step = ()
            ev.append(Reply(R_AUTH_MALFORMED))
            return
        self.auth_step, self.mode = ("pass", user), AUTH
        ev.append(Reply(PROMPT_PASSWORD))

    def _check(self, user: bytes, password: bytes, ev: list) -> None:
        from .sasl import usable
        if not usable(user, password):
            self.auth_step = ()
            ev.append(Reply(R_AUTH_MALFORMED))
            return
        self.auth_step = ("check", user)
        self.mode = CHECKING_PASSWORD
        ev.append(CheckPassword(user, password))

    def _dohelo(self, arg: bytes) -> None:
        self.seenmail = False
        self.helo = arg if arg.lower() != self.peer.remotehost.lower() else None

    def smtp_quit(self, arg: bytes, ev: list) -> None:
        ev += [Reply(self._greet(b"221 ") + b"\r\n"), Close()]
        self.mode = DONE
        self.quit = True
        self.buf = b""

    def smtp_rset(self, arg: bytes, ev: list) -> None:
        self.seenmail = False
        ev.append(Reply(b"250 flushed\r\n"))

    def smtp_noop(self, arg: bytes, ev: list) -> None:
        ev.append(Reply(b"250 ok\r\n"))

    def smtp_vrfy(self, arg: bytes, ev: list) -> None:
        ev.append(Reply(b"252 send some mail, i'll try my best\r\n"))

    def smtp_help(self, arg: bytes, ev: list) -> None:
        ev.append(Reply(R_HELP))

    def _addr(self, arg: bytes) -> bytes | None:
        return addrparse(arg, self.c.liphost, self.ipme)

    def smtp_mail(self, arg: bytes, ev: list) -> None:
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

    def smtp_rcpt(self, arg: bytes, ev: list) -> None:
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
                ev.append(Reply(R_NOGATEWAY))
                return
            why = "rcpthosts" if self.validrcptto is None else "validrcptto"
            if self.validrcptto is not None and not self._valid(addr, ev):
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

    def _valid(self, addr: bytes, ev: list) -> bool:
        """The validrcptto.cdb lookup (REFERENCE §1, ``checker.check``: the first key
        found decides), logged at VALIDRCPTTO_LOG 1 and 2."""
        assert self.validrcptto is not None
        verdict = check(self.validrcptto, addr)
        level = self.policy.loglevel
        if level >= 1:
            ev.append(Log(self._vlog(f"RCPT TO: {escape(lower(addr))}")))
        if level >= 2:
            ev += [Log(self._vlog(f"trying: {escape(key)}"))
                   for key in verdict.tried[:TRY_LOG_MAX]]
            if len(verdict.tried) > TRY_LOG_MAX:
                more = len(verdict.tried) - TRY_LOG_MAX
                ev.append(Log(self._vlog(f"trying: ({more} more keys not logged)")))
        if verdict.key is not None and level >= 1:
            ev.append(Log(self._vlog(f"{'found' if verdict.accepted else 'reject'}: "
                                     f"{escape(verdict.key)}")))
        if not verdict.accepted:
            ev.append(Log(self._vlog(f"not found: {escape(addr)}")))
        return bool(verdict.accepted)

    def smtp_data(self, arg: bytes, ev: list) -> None:
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


