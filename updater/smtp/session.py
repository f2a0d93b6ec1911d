"""The qmail-smtpd conversation (netqmail 1.06 plus the validrcptto.cdb check) as an I/O-free
state machine, in the style of h11: bytes in, events out (``events``: the events, the states
and the contract a driver keeps, SMTP_BATCH and ``proceed()`` included).  Only this module assigns
the session's state; DATA (``blast.Message``) and AUTH (``sasl``) are sub-machines that return
their events and where they ended, imported when first needed, as is ``received``."""

from __future__ import annotations

from collections.abc import Callable  # (not typing: start-up counts here)

from ..limits import SMTP_BATCH, TARPIT_MAX
from .addresses import addrparse, badmailfrom, recipient
from .context import Controls, Lookup, Peer, Policy
from .envelope import Envelope
from .events import (
    _READING,
    _READING_LINES,
    AUTH,
    CALLBACKS,
    CHECKING_PASSWORD,
    COMMAND,
    DATA,
    DONE,
    QUEUE_CLOSING,
    QUEUE_OPENING,
    TLS_STARTING,
    Close,
    Event,
    Log,
    Pause,
    ProtocolError,
    QueueAbort,
    QueueOpen,
    Reply,
    StartTls,
)
from .framing import TOO_LONG, next_line
from .replies import (
    COUNTED,
    R_FLUSHED,
    R_HELP,
    R_MAILFIRST,
    R_OK,
    R_QQT,
    R_RCPTFIRST,
    R_SYNTAX,
    R_TIMEOUT,
    R_TLS_AGAIN,
    R_TLS_PIPELINED,
    R_TLS_READY,
    R_TOOLONG,
    R_TOOMANY,
    R_UNIMPL,
    R_VRFY,
    Acceptance,
    Refusal,
    ehlo,
    goodbye,
    greeting,
    helo,
)

TYPE_CHECKING = False
if TYPE_CHECKING:                  # (no cycle: blast and sasl know nothing of the session)
    from .blast import Message
    from .sasl import Next


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
        self.env: Envelope | None = None          # after MAIL (qmail's seenmail)
        self.invalid = 0
        self.refused = 0                            # RCPTs refused (the tarpit's n)
        self.buf = b""
        self.discarding = False                   # inside an over-long command line
        self.mode = COMMAND
        self.held = False                         # lines left for proceed()
        self.quit = False                         # QUIT ended it (qmail exits 0)
        self.message: Message | None = None       # DATA, from 354 to qmail-queue's exit
        self.message_env: Envelope | None = None  # its envelope
        self.rest = False                         # bytes follow the command line
        self.drop = False                         # ... and are refused
        self.deadline = self.mono() + controls.timeout
        self.relay = peer.relayclient               # RELAYCLIENT, or b"" after AUTH
        self.tls = False
        self.user: bytes | None = None              # who authenticated
        self.auth_failures = 0
        self.auth_step: Next = None                 # where an AUTH exchange waits
        # what happened, for the driver's metrics: "rcpt.accepted.validrcptto", ... -> n
        self.counts: dict[str, int] = {}
        self.end = ""                               # why it ended: quit, timeout, limit, error

    def count(self, what: str, n: int = 1) -> None:
        assert what in COUNTED, what          # (the metric table is built from COUNTED)
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
        self.helo, self.env, self.mode, self.buf = None, None, COMMAND, b""
        self.deadline = self.mono() + self.c.timeout
        return []

    def auth_result(self, code: int | None) -> list[Event]:
        """The checkpassword program's exit code (None: it hung or could not run)."""
        self._expect("auth_result")
        from .sasl import verdict
        assert self.auth_step is not None
        user, self.auth_step, self.mode = self.auth_step[1], None, COMMAND
        failures = self.auth_failures + (code == 1)
        ev, what = verdict(code, user, self.remote, failures >= self.policy.auth_failures)
        self.count("auth.failed" if what == "hangup" else "auth." + what)
        self.auth_failures = failures
        if what == "ok":
            self.user, self.relay = user, b""
        elif what == "hangup":
            self.count("hangup.auth_failures")
            self._hang_up(ev, "limit")
        return ev if self.mode is DONE else self._resume(ev)

    @property
    def pending(self) -> bool:
        """Whole command lines are waiting for ``proceed()`` (the last call stopped
        after SMTP_BATCH of them)."""
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
        return [Reply(greeting(self.c.greeting))]

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed client bytes; ``b""`` means the client closed its side."""
        if self.mode is DONE:
            return []
        self.deadline = self.mono() + self.c.timeout
        ev: list[Event] = []
        if not data:
            if self.mode is DATA or self.mode is QUEUE_CLOSING:
                ev.append(QueueAbort())
            self._hang_up(ev)
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
        ev.append(Reply(R_TIMEOUT))
        self._hang_up(ev, "timeout")
        return ev

    def _hang_up(self, ev: list[Event], end: str = "") -> None:
        """The one way a session ends: Close after the events so far, nothing more read."""
        ev.append(Close())
        self.mode = DONE
        self.buf = b""
        if end:
            self.end = end

    def queue_opened(self, qp: int | None) -> list[Event]:
        self._expect("queue_opened")
        if qp is None:
            self.mode = COMMAND
            self.count("message.tempfail")
            ev: list[Event] = [Reply(R_QQT)]
        else:
            from .blast import Message  # (imported when a message starts)
            assert self.message_env is not None
            self.message = Message(qp, self.message_env.queue_envelope(), self.c.databytes)
            self.mode = DATA
            ev = Message.begin(self._received())
        return self._resume(ev)

    def queue_closed(self, status: int | None, write_failed: bool = False) -> list[Event]:
        self._expect("queue_closed")
        m = self.message
        assert m is not None
        reply, counted = m.finish(status, write_failed, self.clock())
        self.count(counted)
        self.count("bytes", m.size)
        self.message, self.message_env, self.mode = None, None, COMMAND
        ev: list[Event] = [Reply(reply)]
        return self._resume(ev)

    # ---- the machine
    def _resume(self, ev: list[Event]) -> list[Event]:
        """A callback answered: the deadline starts again, then the lines waiting."""
        self.deadline = self.mono() + self.c.timeout
        self._run(ev)
        return ev

    def _run(self, ev: list[Event]) -> None:
        while self.buf and self.mode in _READING:
            if self.mode is DATA:
                self._data(ev)
                continue
            buf, pos, n = self.buf, 0, len(self.buf)
            lines = 0
            self.held = False
            while pos < n and self.mode in _READING_LINES:
                if lines == SMTP_BATCH:
                    self.held = True
                    break
                lines += 1
                line, pos, self.discarding = next_line(buf, pos, self.discarding)
                if line is None:
                    break
                if line is TOO_LONG:
                    ev.append(Reply(R_TOOLONG))
                    continue
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
        m = self.message
        assert m is not None
        out, used, end = m.absorb(self.buf)
        ev += out
        self.buf = self.buf[used:]
        if end is False:
            self.end = "error"
            self.count("message.rejected")
            self._hang_up(ev)
        elif end:
            self.mode = QUEUE_CLOSING

    def _received(self) -> bytes:
        from .received import protocol, received_line
        p = self.peer
        return received_line(p.local, p.remoteip, p.remotehost, p.remoteinfo, self.helo,
                             self.clock(), protocol(self.tls, self.user is not None))

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

    def smtp_helo(self, arg: bytes, ev: list[Event]) -> None:
        ev.append(Reply(helo(self.c.greeting)))
        self._dohelo(arg)

    def smtp_ehlo(self, arg: bytes, ev: list[Event]) -> None:
        ev.append(Reply(ehlo(self.c.greeting, self.policy.tls and not self.tls,
                             self.auth_offered())))
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
        from .sasl import command  # (imported when AUTH starts)
        self._auth(ev, *command(arg, enabled=self.policy.auth, offered=self.auth_offered(),
                                authed=self.user is not None, in_mail=self.env is not None))

    def _auth_line(self, line: bytes, ev: list[Event]) -> None:
        from .sasl import response
        assert self.auth_step is not None
        self._auth(ev, *response(line, *self.auth_step))

    def _auth(self, ev: list[Event], out: list[Event], step: Next) -> None:
        from .sasl import Step
        ev += out
        self.auth_step = step
        self.mode = COMMAND if step is None else \
            CHECKING_PASSWORD if step[0] is Step.CHECK else AUTH

    def _dohelo(self, arg: bytes) -> None:
        self.env = None
        self.helo = arg if arg.lower() != self.peer.remotehost.lower() else None

    def smtp_quit(self, arg: bytes, ev: list[Event]) -> None:
        ev.append(Reply(goodbye(self.c.greeting)))
        self.quit = True
        self._hang_up(ev)

    def smtp_rset(self, arg: bytes, ev: list[Event]) -> None:
        self.env = None
        ev.append(Reply(R_FLUSHED))

    def _addr(self, arg: bytes) -> bytes | None:
        return addrparse(arg, self.c.liphost, self.ipme)

    def smtp_mail(self, arg: bytes, ev: list[Event]) -> None:
        addr = self._addr(arg)
        if addr is None:
            ev.append(Reply(R_SYNTAX))
            return
        self.env = Envelope(addr, badmailfrom(addr, self.c.badmailfrom))
        ev.append(Reply(R_OK))

    def smtp_rcpt(self, arg: bytes, ev: list[Event]) -> None:
        env = self.env
        if env is None:
            return self._refuse(Refusal.MAILFIRST, ev)
        addr = self._addr(arg)
        if addr is None:
            return self._refuse(Refusal.SYNTAX, ev)
        if env.flagbarf:
            return self._refuse(Refusal.BADMAILFROM, ev)
        relay = self.relay
        if relay is not None:
            addr += relay
            why: Refusal | Acceptance = Acceptance.AUTH if self.user is not None \
                else Acceptance.RELAYCLIENT
        else:
            why, logs = recipient(addr, self.c.rcpthosts, self.more, self.validrcptto,
                                  self.policy.loglevel)
            ev += [Log(f"validrcptto [{self.remote}] {text}") for text in logs]
            if why is Refusal.RCPTHOSTS:
                self._tarpit(ev)
                return self._refuse(why, ev)
            if why is Refusal.VALIDRCPTTO:
                self.invalid += 1
                self._tarpit(ev)
                if self.policy.limit and self.invalid >= self.policy.limit:
                    self.count(why.counter)
                    self.count("hangup.invalid_limit")
                    ev += [Log(f"validrcptto [{self.remote}] excessive violations, "
                               "hanging up"), Reply(R_TOOMANY)]
                    return self._hang_up(ev, "limit")
                return self._refuse(Refusal.NOMAILBOX if self.policy.reply550 else why, ev)
        if self.policy.maxrcpt and env.nrcpt >= self.policy.maxrcpt:
            return self._refuse(Refusal.MAXRCPT, ev)
        assert isinstance(why, Acceptance)
        self.count(why.counter)
        env.rcptto += b"T" + addr + b"\0"
        env.nrcpt += 1
        ev.append(Reply(R_OK))

    def _refuse(self, why: Refusal, ev: list[Event]) -> None:
        """The one way a RCPT is refused: its counter moved, its reply given."""
        self.count(why.counter)
        ev.append(Reply(why.reply))

    def _tarpit(self, ev: list[Event]) -> None:
        """VALIDRCPTTO_TARPIT: the n-th refused RCPT waits n times the tarpit (capped)."""
        self.refused += 1
        if self.policy.tarpit:
            self.count("rcpt.tarpitted")
            ev.append(Pause(min(self.refused * self.policy.tarpit / 1000, TARPIT_MAX)))

    def smtp_data(self, arg: bytes, ev: list[Event]) -> None:
        if self.env is None:
            ev.append(Reply(R_MAILFIRST))
            return
        if not self.env.rcptto:
            ev.append(Reply(R_RCPTFIRST))
            return
        self.message_env, self.env = self.env, None      # qmail: seenmail = 0
        self.mode = QUEUE_OPENING
        ev.append(QueueOpen())


def _fixed(reply: bytes) -> Callable[[Session, bytes, list[Event]], None]:
    """A command whose reply never varies (NOOP, VRFY, HELP)."""
    return lambda s, arg, ev: ev.append(Reply(reply))


_COMMANDS = {
    b"rcpt": Session.smtp_rcpt, b"mail": Session.smtp_mail, b"data": Session.smtp_data,
    b"quit": Session.smtp_quit, b"helo": Session.smtp_helo, b"ehlo": Session.smtp_ehlo,
    b"rset": Session.smtp_rset, b"help": _fixed(R_HELP), b"noop": _fixed(R_OK),
    b"vrfy": _fixed(R_VRFY),
    b"starttls": Session.smtp_starttls, b"auth": Session.smtp_auth,
}


