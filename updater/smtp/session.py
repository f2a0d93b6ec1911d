"""The qmail-smtpd conversation (netqmail 1.06 plus the validrcptto.cdb check) as an
I/O-free state machine, in the style of h11.

``Session.receive_data(bytes)`` takes what the client sent and returns events for the
driver to carry out, in order:

- ``Reply(data)``       write these bytes to the client;
- ``Log(text)``         one log line (already escaped), without the ``PROG[PID]: `` prefix;
- ``QueueOpen()``       start qmail-queue, then call ``queue_opened(qp)`` (its pid) or
                        ``queue_opened(None)`` when it could not be started;
- ``QueueData(data)``   write these message bytes to qmail-queue's fd 0;
- ``QueueClose(envelope)``  close fd 0; write ``envelope`` to fd 1 (``None``: write
                        nothing, the message failed) and close it; wait for the exit, then
                        call ``queue_closed(status, write_failed)``;
- ``QueueAbort()``      the message is abandoned: close both pipes, reap qmail-queue;
- ``Close()``           flush the replies so far and close the connection.

A driver feeds one read at a time and carries out every event, answering
QueueOpen/QueueClose, before it reads again: so the session never holds more than one
read plus one partial command line (4 KiB) of client input.  The replies one call may
produce are bounded too: after BATCH command lines the session stops and ``pending``
is true; the driver calls ``proceed()`` for the next batch once the client has taken
the replies so far (a client that sends commands but never reads cannot make the
server hold more than about BATCH replies of output beyond its transport buffer).

Nothing here touches a socket, a file, a process or the clock: the controls, the
lookups (rcpthosts' cdb, validrcptto.cdb, "is this IP mine") and ``clock`` are given to
the constructor (``clock`` for dates, ``monotonic`` for the read deadline).
``deadline`` is when the session's input times out; ``check_timeout()`` turns an expired
one into qmail's ``451 timeout``.  Write time-outs belong to the driver (qmail just exits).
"""

from __future__ import annotations

import re
from collections.abc import Callable       # (not typing: start-up counts here)

from ..checker import candidates, lower

MAXHOPS = 100
COMMAND_LINE_MAX = 4096          # qmail-smtpd has no cap; longer lines get R_TOOLONG
DEFAULT_TIMEOUT = 1200
DEFAULT_LIMIT = 10
TRY_LOG_MAX = 10                 # "trying:" lines per RCPT at VALIDRCPTTO_LOG=2
BATCH = 256                      # command lines per call (each reply is < 1 KiB)

R_TIMEOUT = b"451 timeout (#4.4.2)\r\n"
R_STRAYLF = b"451 See http://pobox.com/~djb/docs/smtplf.html.\r\n"
R_MAILFIRST = b"503 MAIL first (#5.5.1)\r\n"
R_RCPTFIRST = b"503 RCPT first (#5.5.1)\r\n"
R_SYNTAX = b"555 syntax error (#5.5.4)\r\n"
R_BMF = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"
R_NOGATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
R_NOTVALID = b"553 sorry, this recipient is not in my validrcptto list (#5.7.1)\r\n"
R_TOOMANY = b"421 too many invalid addresses, goodbye (#4.3.0)\r\n"
R_MAXRCPT = b"452 too many recipients (#4.5.3)\r\n"
R_UNIMPL = b"502 unimplemented (#5.5.1)\r\n"
R_TOOLONG = b"500 line too long (#5.5.2)\r\n"
R_QQT = b"451 qqt failure (#4.3.0)\r\n"
R_HOPS = b"554 too many hops, this message is looping (#5.4.6)\r\n"
R_SIZE = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
R_HELP = b"214 netqmail home page: http://qmail.org/netqmail\r\n"
R_TLS_READY = b"220 ready for tls\r\n"
R_TLS_AGAIN = b"454 TLS already active (#4.7.0)\r\n"
R_TLS_PIPELINED = b"501 nothing may follow STARTTLS before the handshake (#5.5.1)\r\n"
R_AUTH_OK = b"235 ok, go ahead (#2.0.0)\r\n"
R_AUTH_BAD = b"535 authorization failed (#5.7.0)\r\n"
R_AUTH_TEMP = b"454 temporary authentication failure (#4.3.0)\r\n"
R_AUTH_MALFORMED = b"501 malformed auth input (#5.5.4)\r\n"
R_AUTH_CANCELLED = b"501 auth exchange cancelled (#5.0.0)\r\n"
R_AUTH_TYPE = b"504 auth type unimplemented (#5.5.1)\r\n"
R_AUTH_AGAIN = b"503 you're already authenticated (#5.5.0)\r\n"
R_AUTH_INMAIL = b"503 no auth during mail transaction (#5.5.0)\r\n"
R_AUTH_NEEDTLS = b"538 encryption required for requested authentication mechanism (#5.7.11)\r\n"
R_AUTH_TOOMANY = b"421 too many authentication failures, closing connection (#4.7.0)\r\n"


# --------------------------------------------------------------------------- events
# Plain slotted classes: the tcpserver front end builds this module once per connection,
# and NamedTuple classes cost milliseconds to create.

class _Record:
    __slots__ = ()

    def __init__(self, *args, **kw):
        for name, value in zip(self.__slots__, args):
            setattr(self, name, value)
        for name in self.__slots__[len(args):]:
            setattr(self, name, kw.pop(name) if name in kw else self._defaults[name])
        if kw:
            raise TypeError(f"unknown fields {sorted(kw)}")

    _defaults: dict = {}

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and \
            all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def _replace(self, **kw):
        return type(self)(**{n: kw.get(n, getattr(self, n)) for n in self.__slots__})


class Reply(_Record):
    __slots__ = ("data",)


class Log(_Record):
    __slots__ = ("text",)


class QueueOpen(_Record):
    __slots__ = ()


class QueueData(_Record):
    __slots__ = ("data",)


class QueueClose(_Record):
    __slots__ = ("envelope",)


class QueueAbort(_Record):
    __slots__ = ()


class Close(_Record):
    __slots__ = ()


class StartTls(_Record):
    """Start the TLS handshake now, then call ``tls_started()`` (or close on failure)."""
    __slots__ = ()


class CheckPassword(_Record):
    """Run the checkpassword program; then ``auth_result(exit code or None)``."""
    __slots__ = ("user", "password")

    def __repr__(self) -> str:                    # never the password, not even in a repr
        return f"CheckPassword(user={self.user!r}, password=...)"


# --------------------------------------------------------------------------- pure rules

def scan_ulong(text: str | bytes | None) -> int:
    """C scan_ulong: the leading ASCII digits (modulo 2**64), 0 when there are none."""
    if isinstance(text, str):
        text = text.encode("latin-1", "replace")
    m = re.match(rb"[0-9]*", text or b"")
    return int(m.group()) % (1 << 64) if m.group() else 0


def escape(data: bytes, limit: int = 300) -> str:
    """Client bytes for a log line: printable ASCII as is, everything else \\xNN."""
    cut = data[:limit]
    out = "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02x}" for b in cut)
    return out + ("..." if len(data) > limit else "")


def qq_reply(status: int | None, flagerr: bool = False) -> bytes | None:
    """qmail_close()'s verdict on qmail-queue's exit code as the reply line; None means
    the message was accepted.  ``status`` None: killed by a signal."""
    if status is None:
        return b"451 qq crashed (#4.3.0)\r\n"
    if status == 0 and not flagerr:
        return None
    text = _QQ.get(status)
    if text is None:
        text = "Dqq permanent problem (#5.3.0)" if 11 <= status <= 40 \
            else "Zqq temporary problem (#4.3.0)"
    return (b"554 " if text[0] == "D" else b"451 ") + text[1:].encode() + b"\r\n"


_QQ = {11: "Denvelope address too long for qq (#5.1.3)",
       31: "Dmail server permanently rejected message (#5.3.0)",
       51: "Zqq out of memory (#4.3.0)", 52: "Zqq timeout (#4.3.0)",
       53: "Zqq write error or disk full (#4.3.0)", 0: "Zqq read error (#4.3.0)",
       54: "Zqq read error (#4.3.0)", 55: "Zqq unable to read configuration (#4.3.0)",
       56: "Zqq trouble making network connection (#4.3.0)",
       61: "Zqq trouble in home directory (#4.3.0)",
       71: "Zmail server temporarily rejected message (#4.3.0)",
       72: "Zconnection to mail server timed out (#4.4.1)",
       73: "Zconnection to mail server rejected (#4.4.1)",
       74: "Zcommunication with mail server failed (#4.4.2)",
       81: "Zqq internal bug (#4.3.0)", 91: "Zqq internal bug (#4.3.0)",
       120: "Zunable to exec qq (#4.3.0)"}
_QQ[115] = _QQ[11]                                    # compatibility
for _code in range(62, 67):
    _QQ[_code] = "Zqq trouble creating files in queue (#4.3.0)"


_IPLIT = re.compile(rb"\[([0-9]+)\.([0-9]+)\.([0-9]+)\.([0-9]+)\]\Z")


def addrparse(arg: bytes, liphost: bytes | None = None,
              ipme: Callable[[tuple[int, int, int, int]], bool] | None = None) -> bytes | None:
    """qmail-smtpd's addrparse: the address between <...> (else after the colon, up to a
    space), a source route dropped, quotes and backslashes removed; ``box@[a.b.c.d]`` of
    one of this host's IPs becomes ``box@LIPHOST``.  None when 900 bytes or longer."""
    i = arg.find(b"<")
    if i != -1:
        terminator = 62                                # '>'
        arg = arg[i + 1:]
    else:
        terminator = 32                                # ' '
        j = arg.find(b":")
        arg = arg[j + 1:] if j != -1 else b""
        arg = arg.lstrip(b" ")
    if arg[:1] == b"@":                                # strip source route
        j = arg.find(b":")
        arg = arg[j + 1:] if j != -1 else b""
    if 34 not in arg and 92 not in arg:                # fast path: nothing to unquote
        j = arg.find(bytes((terminator,)))
        out = arg if j == -1 else arg[:j]
    else:
        buf = bytearray()
        escaped = quoted = False
        for ch in arg:
            if escaped:
                buf.append(ch)
                escaped = False
            elif not quoted and ch == terminator:
                break
            elif ch == 92:
                escaped = True
            elif ch == 34:
                quoted = not quoted
            else:
                buf.append(ch)
        out = bytes(buf)
    if liphost is not None:
        at = out.rfind(b"@")
        if at != -1:
            m = _IPLIT.match(out, at + 1)
            if m and ipme is not None and ipme(tuple(int(x) & 0xFF for x in m.groups())):
                out = out[:at + 1] + liphost
    if len(out) + 1 > 900:
        return None
    return out


def host_suffixes(domain: bytes) -> list[bytes]:
    """The domain and each ``.parent`` suffix, as rcpthosts matches them."""
    return [domain] + [domain[j:] for j in range(1, len(domain)) if domain[j] == 46]


def rcpthosts_allows(address: bytes, hosts: frozenset[bytes] | None,
                     more: Callable[[bytes], bytes | None] | None) -> bool:
    """qmail's rcpthosts(): no rcpthosts file allows everything; an address without ``@``
    is allowed; else the lowercased domain, or a ``.suffix`` of it, must be in rcpthosts
    or morercpthosts.cdb."""
    if hosts is None:
        return True
    at = address.rfind(b"@")
    if at == -1:
        return True
    domain = address[at + 1:].lower()
    if not domain:
        return False
    keys = host_suffixes(domain)
    if any(k in hosts for k in keys):
        return True
    return more is not None and any(more(k) is not None for k in keys)


def badmailfrom(address: bytes, bmf: frozenset[bytes] | None) -> bool:
    """The whole address or its ``@domain`` is listed (case-insensitively)."""
    if not bmf:
        return False
    a = address.lower()
    if a in bmf:
        return True
    at = a.rfind(b"@")
    return at != -1 and a[at:] in bmf


def _safe(value: bytes) -> bytes:
    return _UNSAFE.sub(b"?", value)


_UNSAFE = re.compile(rb"[^A-Za-z0-9.@%+/=:\-]")
_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct",
           b"Nov", b"Dec")


def date822(when: float) -> bytes:
    """qmail's date822fmt: ``25 Nov 2026 19:09:31 -0000`` (UTC, day not zero-padded)."""
    import time
    t = time.gmtime(int(when))
    return b"%d %s %d %02d:%02d:%02d -0000" % (t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year,
                                                t.tm_hour, t.tm_min, t.tm_sec)


def received_line(local: bytes, remoteip: bytes, remotehost: bytes, remoteinfo: bytes | None,
                  helo: bytes | None, when: float, proto: bytes = b"SMTP") -> bytes:
    """The header qmail-smtpd's received() prepends (protocol SMTP; with TLS or AUTH,
    RFC 3848's ESMTPS, ESMTPA, ESMTPSA)."""
    line = b"Received: from " + _safe(remotehost)
    if helo is not None:
        line += b" (HELO " + _safe(helo) + b")"
    line += b" ("
    if remoteinfo is not None:
        line += _safe(remoteinfo) + b"@"
    return line + _safe(remoteip) + b")\n  by " + _safe(local) + b" with " + proto + b"; " + \
        date822(when) + b"\n"


# --------------------------------------------------------------------------- DATA

# Inside a run of complete lines (no bare LF, no terminator), a leading dot is removed
# unless a CR follows it (blast() keeps ".\r" when no LF comes next).
_UNSTUFF = re.compile(rb"\n\.(?!\r)")


class DataDecoder:
    """qmail-smtpd's blast(): the message up to CRLF.CRLF, dot-stuffing undone, CRLF
    turned into LF (other CRs kept), a bare LF fatal; Received/Delivered header fields
    counted on the raw stream.  Works on whole runs of lines with bytes methods, so the
    cost per byte is C's, whatever the line lengths.

    ``state`` follows blast(): 0 inside a line, 1 at a line start, 2 after a leading
    dot, 3 after a leading dot and CR, 4 after a CR inside a line."""

    def __init__(self):
        self.state = 1
        self.hops = 0
        self.in_header = True
        self.head = b""          # first bytes (up to 9) of the current raw line

    def feed(self, data: bytes) -> tuple[list[bytes], int, bool | None]:
        """Returns (output pieces, bytes consumed, end): end is True after the
        terminating line, False on a bare LF (the session must die), None when more
        input is needed (everything was consumed)."""
        out: list[bytes] = []
        i, n = 0, len(data)
        end: bool | None = None
        while i < n:
            st = self.state
            if st == 1:
                c = data[i]
                if c == 10:
                    end = False
                    break
                if c == 46 and (n - i < 3 or data[i + 1:i + 3] == b"\r\n"):
                    self.state, i = 2, i + 1                      # maybe the terminator
                    continue
                last = data.rfind(b"\n", i)
                if last != -1:
                    stop = data.find(b"\n.\r\n", i, last + 1)     # the terminator's LF
                    if stop == -1:
                        stop = last
                    run = data[i:stop + 1]
                    if run.count(b"\n") != run.count(b"\r\n"):
                        # a bare LF: emit the lines before its line, which then fails
                        k = data.find(b"\n", i)
                        while data[k - 1] == 13:
                            k = data.find(b"\n", k + 1)
                        stop = data.rfind(b"\n", i, k)
                        run = data[i:stop + 1] if stop != -1 else b""
                    if run:
                        if c == 46 or b"\n." in run:
                            run = b"\n" + run
                            run = (_UNSTUFF.sub(b"\n", run) if b"\n.\r" in run
                                   else run.replace(b"\n.", b"\n"))[1:]
                        out.append(run.replace(b"\r\n", b"\n"))
                        i = stop + 1
                        continue
                if c == 46:
                    self.state, i = 2, i + 1
                else:
                    self.state = 0
                continue
            if st == 2:                                           # after "."
                c = data[i]
                if c == 10:
                    end = False
                    break
                if c == 13:
                    self.state, i = 3, i + 1
                    continue
                self.state = 0                                    # the dot is dropped
                continue
            if st == 3:                                           # after ".\r"
                c = data[i]
                if c == 10:
                    i += 1
                    end = True
                    break
                out.append(b".\r")
                i += 1
                if c == 13:
                    self.state = 4
                else:
                    out.append(bytes((c,)))
                    self.state = 0
                continue
            # st 0 or 4: inside a line
            k = data.find(b"\n", i)
            pending = b"\r" if st == 4 else b""
            if k == -1:
                chunk = data[i:]
                if chunk.endswith(b"\r"):
                    out.append(pending + chunk[:-1])
                    self.state = 4
                else:
                    out.append(pending + chunk)
                    self.state = 0
                i = n
                continue
            if k == i:
                if st != 4:
                    end = False
                    break
                out.append(b"\n")
            else:
                if data[k - 1] != 13:
                    end = False
                    break
                out.append(pending + data[i:k - 1] + b"\n")
            i = k + 1
            self.state = 1
        if self.in_header and self.hops < MAXHOPS:
            self._count(data[:i] if end is not False else data[:n])
        return out, i, end

    def _count(self, raw: bytes) -> None:
        """Count on complete raw lines only (case-insensitively, with bytes.count); keep
        the first bytes of the partial line for the next call."""
        text = self.head + raw
        last = text.rfind(b"\n")
        self.head = text[last + 1:last + 10]
        if last == -1:
            return
        low = b"\n" + text[:last + 1].lower()         # every line now follows a LF
        blank = low.find(b"\n\r\n")
        if blank != -1:
            low = low[:blank + 1]
            self.in_header = False
        self.hops += low.count(b"\nreceived") + low.count(b"\ndelivered")


# --------------------------------------------------------------------------- session

class Controls(_Record):
    """What qmail-smtpd reads at start-up (see ``controls.read_controls``):
    greeting; liphost (control/localiphost, else control/me); rcpthosts (None: the file
    does not exist) and badmailfrom, lowercased; databytes (0: no limit); timeout (s)."""
    __slots__ = ("greeting", "liphost", "rcpthosts", "badmailfrom", "databytes", "timeout")


class Peer(_Record):
    """The connection's tcpserver environment, as bytes (remoteinfo and relayclient
    None when unset)."""
    __slots__ = ("remoteip", "remotehost", "remoteinfo", "local", "relayclient")
    _defaults = {"remoteip": b"unknown", "remotehost": b"unknown", "remoteinfo": None,
                 "local": b"unknown", "relayclient": None}


class Policy(_Record):
    """VALIDRCPTTO_LIMIT (0: none), VALIDRCPTTO_LOG, MAXRCPT (0: none); tls: STARTTLS may
    be offered (a certificate is loaded); auth: AUTH may be offered (a checkpassword
    program is set); auth_plaintext: also before STARTTLS (AUTH_PLAINTEXT);
    auth_failures: failed AUTH attempts before 421 (AUTH_MAX_FAILURES, default 3)."""
    __slots__ = ("limit", "loglevel", "maxrcpt", "tls", "auth", "auth_plaintext",
                 "auth_failures")
    _defaults = {"limit": DEFAULT_LIMIT, "loglevel": 0, "maxrcpt": 0, "tls": False,
                 "auth": False, "auth_plaintext": False, "auth_failures": 3}


def peer_from_env(env) -> Peer:
    def b(name: str) -> bytes | None:
        v = env.get(name)
        return None if v is None else v.encode("utf-8", "surrogateescape")
    def first(*values: bytes | None) -> bytes:
        return next(v for v in values if v is not None)       # set but empty counts
    return Peer(remoteip=first(b("TCPREMOTEIP"), b"unknown"),
                remotehost=first(b("TCPREMOTEHOST"), b"unknown"),
                remoteinfo=b("TCPREMOTEINFO"),
                local=first(b("TCPLOCALHOST"), b("TCPLOCALIP"), b"unknown"),
                relayclient=b("RELAYCLIENT"))


def policy_from_env(env, tls: bool = False, auth: bool = False) -> Policy:
    return Policy(limit=scan_ulong(env.get("VALIDRCPTTO_LIMIT", str(DEFAULT_LIMIT))),
                  loglevel=scan_ulong(env.get("VALIDRCPTTO_LOG")),
                  maxrcpt=scan_ulong(env.get("MAXRCPT")),
                  tls=tls and env.get("DISABLETLS") is None, auth=auth,
                  auth_plaintext=env.get("AUTH_PLAINTEXT", "") not in ("", "0"),
                  auth_failures=scan_ulong(env.get("AUTH_MAX_FAILURES", "3")) or 3)


_CMD, _DATA, _WAIT, _DONE, _AUTH = range(5)


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
        self.mode = _CMD
        self.held = False                         # lines left for proceed()
        self.quit = False                         # QUIT ended it (qmail exits 0)
        self.data: DataDecoder | None = None
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
        return self.mode == _DONE

    def tls_started(self) -> list:
        """The handshake is done: everything known before it is forgotten (RFC 3207)."""
        self.tls = True
        self.count("tls")
        self.helo = None
        self.seenmail = False
        self.rcptto = bytearray()
        self.mailfrom = b""
        self.mode = _CMD
        self.buf = b""
        self.deadline = self.mono() + self.c.timeout
        return []

    def auth_result(self, code: int | None) -> list:
        """The checkpassword program's exit code (None: it hung or could not run)."""
        ev: list = []
        user, self.auth_step = self.auth_step[1], ()
        self.mode = _CMD
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
                self.mode = _DONE
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
        return self.held and self.mode in (_CMD, _AUTH)

    def proceed(self) -> list:
        """The next batch of the command lines already received."""
        ev: list = []
        if self.pending:
            self._run(ev)
        return ev

    def idle(self) -> bool:
        """Between commands: every reply owed has been given, no command half read, no
        message in progress (a server shutting down may say 421 now)."""
        return self.mode == _CMD and not self.buf and not self.discarding

    def start(self) -> list:
        return [Reply(b"220 " + self.c.greeting + b" ESMTP\r\n")]

    def receive_data(self, data: bytes) -> list:
        """Feed client bytes; ``b""`` means the client closed its side."""
        if self.mode == _DONE:
            return []
        self.deadline = self.mono() + self.c.timeout
        ev: list = []
        if not data:
            if self.mode in (_DATA, _WAIT) and self.data is not None:
                ev.append(QueueAbort())
            self.mode = _DONE
            ev.append(Close())
            return ev
        self.buf += data
        self._run(ev)
        return ev

    def check_timeout(self) -> list:
        """The read deadline passed (per the clock): ``451 timeout`` and close."""
        if self.mode not in (_CMD, _DATA, _AUTH) or self.mono() < self.deadline:
            return []
        ev: list = []
        if self.mode == _DATA:
            ev.append(QueueAbort())
        self.mode = _DONE
        self.end = "timeout"
        ev += [Reply(R_TIMEOUT), Close()]
        return ev

    def queue_opened(self, qp: int | None) -> list:
        ev: list = []
        if qp is None:
            self.mode = _CMD
            self.count("message.tempfail")
            ev.append(Reply(R_QQT))
        else:
            self.qp = qp
            self.mode = _DATA
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
        d = self.data
        hops = d.hops >= MAXHOPS
        overflow = bool(self.c.databytes) and self.size > self.c.databytes
        self.data = None
        self.mode = _CMD
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
        while self.buf and self.mode in (_CMD, _DATA, _AUTH):
            if self.mode == _DATA:
                self._data(ev)
                continue
            buf, pos, n = self.buf, 0, len(self.buf)
            lines = 0
            self.held = False
            while pos < n and self.mode in (_CMD, _AUTH):
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
                if self.mode == _AUTH:
                    self._auth_line(line, ev)
                else:
                    self._command(line, ev)
                    if self.mode == _WAIT and ev and type(ev[-1]) is StartTls:
                        if pos < n:                      # bytes after STARTTLS: refused
                            ev[-2:] = [Reply(R_TLS_PIPELINED)]
                            self.mode, pos = _CMD, n
                        else:
                            self.buf = b""
                            return
            if self.mode == _DONE:
                return
            self.buf = buf[pos:]
            if self.mode in (_CMD, _AUTH):
                return                                   # no complete line left

    def _data(self, ev: list) -> None:
        d = self.data
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
            self.mode = _DONE
            self.buf = b""
        elif end:
            hops = d.hops >= MAXHOPS
            overflow = bool(limit) and self.size > limit
            envelope = None if hops or overflow else \
                b"F" + self.mailfrom + b"\0" + bytes(self.rcptto) + b"\0"
            ev.append(QueueClose(envelope))
            self.mode = _WAIT

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
        else:
            ev += [Reply(R_TLS_READY), StartTls()]
            self.mode = _WAIT

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
        mech, _, initial = arg.partition(b" ")
        mech, initial = mech.lower(), initial.strip()
        if mech == b"plain":
            if initial:
                self._auth_plain(initial, ev)
            else:
                self.auth_step, self.mode = ("plain",), _AUTH
                ev.append(Reply(b"334 \r\n"))
        elif mech == b"login":
            if initial:
                self._auth_login_user(initial, ev)
            else:
                self.auth_step, self.mode = ("user",), _AUTH
                ev.append(Reply(b"334 VXNlcm5hbWU6\r\n"))          # "Username:"
        else:
            ev.append(Reply(R_AUTH_TYPE))

    def _auth_line(self, line: bytes, ev: list) -> None:
        line = line.rstrip(b"\r").strip()
        step, self.mode = self.auth_step, _CMD
        if line == b"*":
            self.auth_step = ()
            ev.append(Reply(R_AUTH_CANCELLED))
        elif step[0] == "plain":
            self._auth_plain(line, ev)
        elif step[0] == "user":
            self._auth_login_user(line, ev)
        else:
            password = _b64(line)
            if password is None:
                self.auth_step = ()
                ev.append(Reply(R_AUTH_MALFORMED))
            else:
                self._check(step[1], password, ev)

    def _auth_plain(self, data: bytes, ev: list) -> None:
        raw = _b64(data)
        parts = raw.split(b"\0") if raw is not None else []
        if len(parts) != 3 or not parts[1]:
            self.auth_step = ()
            ev.append(Reply(R_AUTH_MALFORMED))
            return
        self._check(parts[1], parts[2], ev)

    def _auth_login_user(self, data: bytes, ev: list) -> None:
        user = _b64(data)
        if not user:
            self.auth_step = ()
            ev.append(Reply(R_AUTH_MALFORMED))
            return
        self.auth_step, self.mode = ("pass", user), _AUTH
        ev.append(Reply(b"334 UGFzc3dvcmQ6\r\n"))                # "Password:"

    def _check(self, user: bytes, password: bytes, ev: list) -> None:
        if b"\0" in user or b"\0" in password:
            self.auth_step = ()
            ev.append(Reply(R_AUTH_MALFORMED))
            return
        self.auth_step = ("check", user)
        self.mode = _WAIT
        ev.append(CheckPassword(user, password))

    def _dohelo(self, arg: bytes) -> None:
        self.seenmail = False
        self.helo = arg if arg.lower() != self.peer.remotehost.lower() else None

    def smtp_quit(self, arg: bytes, ev: list) -> None:
        ev += [Reply(self._greet(b"221 ") + b"\r\n"), Close()]
        self.mode = _DONE
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
                    self.mode = _DONE
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
        """The validrcptto.cdb lookup (REFERENCE §1): the first key found decides."""
        level = self.policy.loglevel
        get = self.validrcptto
        if level >= 1:
            ev.append(Log(self._vlog(f"RCPT TO: {escape(lower(addr))}")))
        verdict_key = verdict_value = None
        tries = 0
        for key in candidates(lower(addr)):
            if level >= 2:
                tries += 1
                if tries <= TRY_LOG_MAX:
                    ev.append(Log(self._vlog(f"trying: {escape(key)}")))
            value = get(key)
            if value is not None:
                verdict_key, verdict_value = key, value
                break
        if level >= 2 and tries > TRY_LOG_MAX:
            ev.append(Log(self._vlog(f"trying: ({tries - TRY_LOG_MAX} more keys not logged)")))
        accepted = verdict_value is not None and not verdict_value.startswith(b"-")
        if verdict_key is not None and level >= 1:
            ev.append(Log(self._vlog(f"{'found' if accepted else 'reject'}: "
                                     f"{escape(verdict_key)}")))
        if not accepted:
            ev.append(Log(self._vlog(f"not found: {escape(addr)}")))
        return accepted

    def smtp_data(self, arg: bytes, ev: list) -> None:
        if not self.seenmail:
            ev.append(Reply(R_MAILFIRST))
            return
        if not self.rcptto:
            ev.append(Reply(R_RCPTFIRST))
            return
        self.seenmail = False
        self.mode = _WAIT
        ev.append(QueueOpen())


_COMMANDS = {
    b"rcpt": Session.smtp_rcpt, b"mail": Session.smtp_mail, b"data": Session.smtp_data,
    b"quit": Session.smtp_quit, b"helo": Session.smtp_helo, b"ehlo": Session.smtp_ehlo,
    b"rset": Session.smtp_rset, b"help": Session.smtp_help, b"noop": Session.smtp_noop,
    b"vrfy": Session.smtp_vrfy, b"starttls": Session.smtp_starttls, b"auth": Session.smtp_auth,
}


def _b64(data: bytes) -> bytes | None:
    import binascii
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
