"""validrcptto-smtpd: an SMTP server that answers like qmail-smtpd with the validrcptto
patch (REFERENCE §1 and §5), and hands accepted mail to qmail-queue.

Front ends: stdin/stdout (run it where qmail-smtpd runs, under tcpserver), or
``--listen HOST:PORT`` (a threaded server, one session per connection).  One process
per connection means start-up cost matters: this module imports only what a session
needs, and the DATA path's imports are deferred until a message arrives.
"""

from __future__ import annotations

import os
import select
import sys
import time

from .checker import check, open_cdb
from .errors import SourceError
from .qmail import control_lines, read_text

PROG = "validrcptto-smtpd"
MAXHOPS = 100
COMMAND_LINE_MAX = 4096           # qmail has no cap; we refuse longer command lines
DATA_CHUNK = 65536
DEFAULT_TIMEOUT = 1200
DEFAULT_LIMIT = 10

R_CONTROLS = b"421 unable to read controls (#4.3.0)\r\n"
R_TIMEOUT = b"451 timeout (#4.4.2)\r\n"
R_STRAYLF = b"451 See http://pobox.com/~djb/docs/smtplf.html.\r\n"
R_MAILFIRST = b"503 MAIL first (#5.5.1)\r\n"
R_RCPTFIRST = b"503 RCPT first (#5.5.1)\r\n"
R_SYNTAX = b"555 syntax error (#5.5.4)\r\n"
R_NOGATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
R_NOTVALID = b"553 sorry, this recipient is not in my validrcptto list (#5.7.1)\r\n"
R_TOOMANY = b"421 too many invalid addresses, goodbye (#4.3.0)\r\n"
R_UNIMPL = b"502 unimplemented (#5.5.1)\r\n"
R_TOOLONG = b"500 line too long (#5.5.2)\r\n"
R_HOPS = b"554 too many hops, this message is looping (#5.4.6)\r\n"
R_SIZE = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"

# qmail-queue exit code -> (permanent?, text), as qmail-smtpd reports them
QQ_TEXT = {
    11: (True, "envelope address too long for qq (#5.1.3)"),
    31: (True, "mail server permanently rejected message (#5.3.0)"),
    51: (False, "qq out of memory (#4.3.0)"),
    52: (False, "qq timeout (#4.3.0)"),
    53: (False, "qq write error or disk full (#4.3.0)"),
    54: (False, "qq read error (#4.3.0)"),
    55: (False, "qq unable to read configuration (#4.3.0)"),
    56: (False, "qq trouble making network connection (#4.3.0)"),
    61: (False, "qq trouble in home directory (#4.3.0)"),
    71: (False, "mail server temporarily rejected message (#4.3.0)"),
    72: (False, "connection to mail server timed out (#4.4.1)"),
    73: (False, "connection to mail server rejected (#4.4.1)"),
    74: (False, "communication with mail server failed (#4.4.2)"),
    81: (False, "qq internal bug (#4.3.0)"),
    91: (False, "qq internal bug (#4.3.0)"),
    120: (False, "unable to exec qq (#4.3.0)"),
}
for _code in range(62, 67):
    QQ_TEXT[_code] = (False, "qq trouble creating files in queue (#4.3.0)")


def qq_reply(code: int) -> bytes:
    """The reply for a qmail-queue exit status (negative: killed by a signal)."""
    if code < 0:
        permanent, text = False, "qq crashed (#4.3.0)"
    elif code in QQ_TEXT:
        permanent, text = QQ_TEXT[code]
    elif 11 <= code <= 40:
        permanent, text = True, "qq permanent problem (#5.3.0)"
    else:
        permanent, text = False, "qq temporary problem (#4.3.0)"
    return (b"554 " if permanent else b"451 ") + text.encode() + b"\r\n"


def scan_ulong(text: str | None) -> int:
    """C scan_ulong: the leading ASCII digits, 0 when there are none."""
    digits = 0
    for ch in text or "":
        if not ("0" <= ch <= "9"):
            break
        digits = digits * 10 + (ord(ch) - 48)
    return digits


def escape(data: bytes, limit: int = 300) -> str:
    """Client bytes for a log line: printable ASCII as is, everything else \\xNN."""
    cut = data[:limit]
    out = "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02x}" for b in cut)
    return out + ("..." if len(data) > limit else "")


def addrparse(arg: bytes) -> bytes | None:
    """qmail-smtpd's address parser: the address between <...> (or after the colon),
    source route stripped, quotes and backslashes removed; None if over 900 bytes."""
    i = arg.find(b"<")
    if i != -1:
        terminator = ord(">")
        arg = arg[i + 1:]
    else:
        terminator = ord(" ")
        j = arg.find(b":")
        arg = arg[j + 1:] if j != -1 else b""
        arg = arg.lstrip(b" ")
    if arg[:1] == b"@":                               # strip source route
        j = arg.find(b":")
        arg = arg[j + 1:] if j != -1 else b""
    out = bytearray()
    escaped = quoted = False
    for ch in arg:
        if escaped:
            out.append(ch)
            escaped = False
        elif not quoted and ch == terminator:
            break
        elif ch == 92:                                 # backslash
            escaped = True
        elif ch == 34:                                 # double quote
            quoted = not quoted
        else:
            out.append(ch)
    if len(out) + 1 > 900:
        return None
    return bytes(out)


def rcpthosts_allows(address: bytes, hosts: set[bytes] | None, more_cdb: str) -> bool:
    """qmail's rcpthosts rule: no rcpthosts file allows everything; an address without
    ``@`` is allowed; else the domain or any ``.parent`` suffix must be listed in
    control/rcpthosts or control/morercpthosts.cdb."""
    if hosts is None:
        return True
    at = address.rfind(b"@")
    if at == -1:
        return True
    domain = address[at + 1:].lower()
    suffixes = [domain] + [domain[j:] for j in range(len(domain)) if domain[j:j + 1] == b"."]
    if any(s in hosts for s in suffixes):
        return True
    try:
        getter = open_cdb(more_cdb)
    except OSError:
        return False
    try:
        return any(getter(s) is not None for s in suffixes)
    finally:
        getter.close()


class Closed(Exception):
    """The client went away (EOF or a write error)."""


class Timeout(Exception):
    pass


class Channel:
    """Buffered line I/O over a pair of file descriptors with a read timeout.  Replies
    are buffered and flushed only when the next read would block, so a pipelined burst
    of commands gets its replies in a few writes."""

    def __init__(self, rfd: int, wfd: int, timeout: float):
        self.rfd, self.wfd, self.timeout = rfd, wfd, timeout
        self.buf = b""
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def flush(self) -> None:
        if not self.out:
            return
        data = b"".join(self.out)
        self.out.clear()
        try:
            while data:
                n = os.write(self.wfd, data)
                data = data[n:]
        except OSError:
            raise Closed() from None

    def _fill(self) -> None:
        self.flush()
        ready, _, _ = select.select([self.rfd], [], [], self.timeout)
        if not ready:
            raise Timeout()
        try:
            chunk = os.read(self.rfd, 65536)
        except OSError:
            raise Closed() from None
        if not chunk:
            raise Closed()
        self.buf += chunk

    def readline(self, limit: int) -> bytes:
        """Up to and including the next LF, or ``limit`` bytes when no LF comes first."""
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i != -1 and i < limit:
                line, self.buf = self.buf[:i + 1], self.buf[i + 1:]
                return line
            if len(self.buf) >= limit:
                line, self.buf = self.buf[:limit], self.buf[limit:]
                return line
            start = len(self.buf)
            self._fill()


class Controls:
    """What qmail-smtpd reads at start-up, read once per connection."""

    def __init__(self, qmail_dir: str, env: dict[str, str]):
        control = os.path.join(qmail_dir, "control")

        def first(name: str) -> str | None:
            lines = control_lines(read_text(os.path.join(control, name)))
            return lines[0][1] if lines else None

        me = first("me")
        self.greeting = (first("smtpgreeting") or me or "").encode("utf-8", "surrogateescape")
        if not self.greeting:
            raise OSError("control/me is missing")
        rh = read_text(os.path.join(control, "rcpthosts"))
        self.rcpthosts = None if rh is None else \
            {line.strip().lower().encode("utf-8", "surrogateescape")
             for _, line in control_lines(rh)}
        self.morercpthosts = os.path.join(control, "morercpthosts.cdb")
        databytes = env.get("DATABYTES")
        if databytes is None:
            databytes = first("databytes")
        self.databytes = scan_ulong(databytes)
        timeout = first("timeoutsmtpd")
        self.timeout = scan_ulong(timeout) if timeout is not None else DEFAULT_TIMEOUT
        self.timeout = self.timeout or DEFAULT_TIMEOUT
        self.qmailqueue = env.get("QMAILQUEUE") or os.path.join(qmail_dir, "bin", "qmail-queue")


class Session:
    """One SMTP conversation.  ``env`` is the tcpserver-style environment of the
    connection (TCPREMOTEIP, RELAYCLIENT, VALIDRCPTTO_*, ...)."""

    def __init__(self, qmail_dir: str, env: dict[str, str], rfd: int, wfd: int,
                 log=None):
        self.qmail_dir, self.env = qmail_dir, env
        self.rfd, self.wfd = rfd, wfd
        self.pid = os.getpid()
        self.remoteip = env.get("TCPREMOTEIP") or "unknown"
        self._log = log or (lambda line: (sys.stderr.write(line + "\n"), sys.stderr.flush()))
        self.relayclient = env.get("RELAYCLIENT")            # present, even empty: bypass
        self.cdb = None
        self.limit = scan_ulong(env.get("VALIDRCPTTO_LIMIT", str(DEFAULT_LIMIT)))
        self.loglevel = scan_ulong(env.get("VALIDRCPTTO_LOG"))
        self.invalid = 0
        self.helo: bytes | None = None
        self.protocol = b"SMTP"
        self.mailfrom: bytes | None = None
        self.rcpts: list[bytes] = []

    # ---- logging
    def vlog(self, text: str) -> None:
        self._log(f"{PROG}[{self.pid}]: validrcptto [{self.remoteip}] {text}")

    # ---- the conversation
    def run(self) -> None:
        ch = None
        try:
            try:
                controls = Controls(self.qmail_dir, self.env)
                path = self.env.get("VALIDRCPTTO_CDB", "")
                if path:
                    self.cdb = open_cdb(path)
            except (OSError, SourceError):
                os.write(self.wfd, R_CONTROLS)
                return
            self.c = controls
            ch = Channel(self.rfd, self.wfd, controls.timeout)
            ch.write(b"220 " + controls.greeting + b" ESMTP\r\n")
            self.loop(ch)
        except Timeout:
            try:
                ch.write(R_TIMEOUT)
                ch.flush()
            except Closed:
                pass
        except (Closed, OSError):
            pass
        finally:
            if self.cdb is not None:
                self.cdb.close()

    def loop(self, ch: Channel) -> None:
        while True:
            line = ch.readline(COMMAND_LINE_MAX)
            if not line.endswith(b"\n"):
                while not ch.readline(COMMAND_LINE_MAX).endswith(b"\n"):
                    pass
                ch.write(R_TOOLONG)
                continue
            line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
            line = line.replace(b"\0", b"\n")              # as qmail's commands.c does
            verb, _, arg = line.partition(b" ")
            arg = arg.lstrip(b" ")
            handler = self.COMMANDS.get(verb.lower())
            if handler is None:
                ch.write(R_UNIMPL)
                continue
            if handler(self, ch, arg) is False:
                ch.flush()
                return

    def greet(self, code: bytes) -> bytes:
        return code + self.c.greeting

    def smtp_helo(self, ch: Channel, arg: bytes):
        self.helo, self.protocol = arg, b"SMTP"
        ch.write(self.greet(b"250 ") + b"\r\n")

    def smtp_ehlo(self, ch: Channel, arg: bytes):
        self.helo, self.protocol = arg, b"ESMTP"
        size = b"250-SIZE %d\r\n" % self.c.databytes if self.c.databytes else b""
        ch.write(self.greet(b"250-") + b"\r\n250-PIPELINING\r\n" + size + b"250 8BITMIME\r\n")

    def smtp_quit(self, ch: Channel, arg: bytes):
        ch.write(self.greet(b"221 ") + b"\r\n")
        return False

    def smtp_noop(self, ch: Channel, arg: bytes):
        ch.write(b"250 ok\r\n")

    def smtp_rset(self, ch: Channel, arg: bytes):
        self.mailfrom, self.rcpts = None, []
        ch.write(b"250 flushed\r\n")

    def smtp_vrfy(self, ch: Channel, arg: bytes):
        ch.write(b"252 send some mail, i'll try my best\r\n")

    def smtp_help(self, ch: Channel, arg: bytes):
        ch.write(b"214 qmail-updater validrcptto-smtpd: "
                 b"send mail to the postmaster of this host\r\n")

    def smtp_mail(self, ch: Channel, arg: bytes):
        addr = addrparse(arg)
        if addr is None:
            ch.write(R_SYNTAX)
            return
        self.mailfrom, self.rcpts = addr, []
        ch.write(b"250 ok\r\n")

    def smtp_rcpt(self, ch: Channel, arg: bytes):
        if self.mailfrom is None:
            ch.write(R_MAILFIRST)
            return
        addr = addrparse(arg)
        if addr is None:
            ch.write(R_SYNTAX)
            return
        if self.relayclient is not None:
            self.rcpts.append(addr + self.relayclient.encode("utf-8", "surrogateescape"))
            ch.write(b"250 ok\r\n")
            return
        if not rcpthosts_allows(addr, self.c.rcpthosts, self.c.morercpthosts):
            ch.write(R_NOGATEWAY)
            return
        if self.cdb is not None and not self.valid(addr):
            self.invalid += 1
            if self.limit and self.invalid >= self.limit:
                self.vlog("excessive violations, hanging up")
                ch.write(R_TOOMANY)
                return False
            ch.write(R_NOTVALID)
            return
        self.rcpts.append(addr)
        ch.write(b"250 ok\r\n")

    def valid(self, addr: bytes) -> bool:
        level = self.loglevel
        if level >= 1:
            self.vlog(f"RCPT TO: {escape(addr.lower())}")
        if level >= 2:
            cdb, vlog = self.cdb, self.vlog

            def get(key: bytes):
                vlog(f"trying: {escape(key)}")
                return cdb(key)
        else:
            get = self.cdb
        verdict = check(get, addr)
        if verdict.key is not None and level >= 1:
            self.vlog(f"{'found' if verdict.accepted else 'reject'}: {escape(verdict.key)}")
        if not verdict.accepted:
            self.vlog(f"not found: {escape(addr)}")
        return verdict.accepted

    def smtp_data(self, ch: Channel, arg: bytes):
        if self.mailfrom is None:
            ch.write(R_MAILFIRST)
            return
        if not self.rcpts:
            ch.write(R_RCPTFIRST)
            return
        import tempfile
        sender, rcpts = self.mailfrom, self.rcpts
        self.mailfrom, self.rcpts = None, []
        with tempfile.TemporaryFile() as spool:
            spool.write(self.received())
            ch.write(b"354 go ahead\r\n")
            hops, size = self.blast(ch, spool)
            if hops >= MAXHOPS:
                ch.write(R_HOPS)
                return
            if self.c.databytes and size > self.c.databytes:
                ch.write(R_SIZE)
                return
            spool.flush()
            spool.seek(0)
            ch.write(self.queue(spool, sender, rcpts))

    def blast(self, ch: Channel, spool) -> tuple[int, int]:
        """Read the message up to CRLF.CRLF: undo dot-stuffing, turn CRLF into LF, refuse a
        bare LF (451 and hang up), count Received:/Delivered-To: headers and bytes."""
        hops = size = 0
        start, pending_cr, in_header = True, False, True
        write = spool.write
        while True:
            seg = ch.readline(DATA_CHUNK)
            if start and not pending_cr:
                if seg == b".\r\n":
                    return hops, size
                if seg[:1] == b"." and seg[:2] != b".\r":
                    seg = seg[1:]
                if in_header:
                    if seg == b"\r\n":
                        in_header = False
                    else:
                        head = seg[:9].lower()
                        if head.startswith(b"received") or head == b"delivered":
                            hops += 1
            if pending_cr:
                seg, pending_cr = b"\r" + seg, False
            if seg.endswith(b"\n"):
                if not seg.endswith(b"\r\n"):
                    ch.write(R_STRAYLF)
                    ch.flush()
                    raise Closed()
                seg = seg[:-2] + b"\n"
                start = True
            else:
                if seg.endswith(b"\r"):
                    seg, pending_cr = seg[:-1], True
                start = False
            size += len(seg)
            if not self.c.databytes or size <= self.c.databytes:
                write(seg)

    def received(self) -> bytes:
        def safe(value: bytes) -> bytes:
            return bytes(b if 33 <= b <= 126 else 63 for b in value)

        env = self.env
        host = env.get("TCPREMOTEHOST") or "unknown"
        line = b"Received: from " + safe(host.encode("utf-8", "surrogateescape"))
        if self.helo is not None:
            line += b" (HELO " + safe(self.helo) + b")"
        line += b" (" + safe(self.remoteip.encode("utf-8", "surrogateescape")) + b")\n  by "
        line += safe((env.get("TCPLOCALHOST") or "unknown").encode("utf-8", "surrogateescape"))
        line += b" with " + self.protocol + b"; "
        line += time.strftime("%d %b %Y %H:%M:%S -0000", time.gmtime()).encode() + b"\n"
        return line

    def queue(self, spool, sender: bytes, rcpts: list[bytes]) -> bytes:
        """Run qmail-queue: the message on its fd 0, the envelope on its fd 1."""
        import subprocess
        envelope = b"F" + sender + b"\0" + b"".join(b"T" + r + b"\0" for r in rcpts) + b"\0"
        r, w = os.pipe()
        try:
            proc = subprocess.Popen([self.c.qmailqueue], stdin=spool, stdout=r,
                                    stderr=subprocess.DEVNULL, close_fds=True)
        except OSError:
            os.close(r)
            os.close(w)
            return qq_reply(120)
        os.close(r)
        try:
            os.write(w, envelope)
        except OSError:
            pass
        finally:
            os.close(w)
        code = proc.wait()
        if code == 0:
            return b"250 ok %d qp %d\r\n" % (int(time.time()), proc.pid)
        return qq_reply(code)

    COMMANDS = {
        b"helo": smtp_helo, b"ehlo": smtp_ehlo, b"quit": smtp_quit, b"noop": smtp_noop,
        b"rset": smtp_rset, b"vrfy": smtp_vrfy, b"help": smtp_help, b"mail": smtp_mail,
        b"rcpt": smtp_rcpt, b"data": smtp_data,
    }


# --------------------------------------------------------------------------- front ends

USAGE = ("usage: validrcptto-smtpd [--qmail-dir DIR] [--listen HOST:PORT]\n"
         "  speaks SMTP on stdin/stdout (under tcpserver), or listens itself with --listen\n")


def parse_args(argv: list[str]) -> tuple[str, str | None]:
    qmail_dir = os.environ.get("QMAIL_DIR") or "/var/qmail"
    listen = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--qmail-dir", "--listen") and i + 1 < len(argv):
            if a == "--qmail-dir":
                qmail_dir = argv[i + 1]
            else:
                listen = argv[i + 1]
            i += 2
        elif a.startswith("--qmail-dir="):
            qmail_dir, i = a.split("=", 1)[1], i + 1
        elif a.startswith("--listen="):
            listen, i = a.split("=", 1)[1], i + 1
        else:
            raise SystemExit(USAGE if a in ("-h", "--help") else f"{PROG}: bad argument {a!r}\n"
                             + USAGE)
    return qmail_dir, listen


def serve(qmail_dir: str, listen: str) -> None:
    """A long-running server: one thread and one Session per connection; the cdb and the
    control files are read again for every connection."""
    import socket
    import threading
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, int(port)))
    srv.listen(128)
    sys.stderr.write(f"{PROG}: listening on {host}:{srv.getsockname()[1]}\n")
    sys.stderr.flush()
    lock = threading.Lock()

    def log(line: str) -> None:
        with lock:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def handle(conn: socket.socket, peer) -> None:
        env = dict(os.environ)
        env["TCPREMOTEIP"] = peer[0]
        env["TCPREMOTEPORT"] = str(peer[1])
        env["TCPLOCALIP"] = conn.getsockname()[0]
        try:
            fd = conn.fileno()
            Session(qmail_dir, env, fd, fd, log).run()
        finally:
            conn.close()

    while True:
        conn, peer = srv.accept()
        threading.Thread(target=handle, args=(conn, peer), daemon=True).start()


def main() -> None:
    qmail_dir, listen = parse_args(sys.argv[1:])
    if listen:
        try:
            serve(qmail_dir, listen)
        except KeyboardInterrupt:
            pass
        except OSError as err:
            sys.stderr.write(f"{PROG}: cannot listen on {listen}: {err.strerror}\n")
            sys.exit(111)
        return
    Session(qmail_dir, dict(os.environ), 0, 1).run()
