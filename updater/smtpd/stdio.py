"""validrcptto-smtpd on fd 0/1, where qmail-smtpd runs (under tcpserver): a thin driver
around ``session.Session``.  One process per connection, so start-up cost counts: only
what a session needs is imported, the DATA path's imports wait for a message.

Reads and writes are bounded by control/timeoutsmtpd as in qmail: a client that stops
reading is dropped when a write cannot proceed for that long.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable

from ..limits import STDIO_READ_SIZE
from ..serving.controlfiles import ControlError
from ..smtp import events as E
from ..smtp.replies import R_CONTROLS
from .controls import IpMe, SessionSetup

TYPE_CHECKING = False          # (typing is not imported: start-up counts here)
if TYPE_CHECKING:
    import ssl
    from collections.abc import Mapping
    from typing import Any

    from .queue import QueueProcess

PROG = "validrcptto-smtpd"


class Gone(Exception):
    """The client went away, a write timed out, or the session closed."""


class Stdio:
    def __init__(self, rfd: int, wfd: int, timeout: float, log: Callable[[str], None]):
        self.rfd, self.wfd, self.timeout, self.log = rfd, wfd, timeout, log
        self.out: list[bytes] = []
        self.tls: ssl.SSLObject | None = None    # after STARTTLS
        for fd in {rfd, wfd}:
            try:
                os.set_blocking(fd, False)
            except OSError:
                pass

    def flush(self) -> None:
        if not self.out:
            return
        data = b"".join(self.out)
        self.out.clear()
        if self.tls is not None:
            self.tls.write(data)
            data = self.outgoing.read()
        self._send(memoryview(data))

    def _send(self, data: memoryview) -> None:
        poller = select.poll()
        poller.register(self.wfd, select.POLLOUT)
        while data:
            try:
                n = os.write(self.wfd, data)
                data = data[n:]
                continue
            except BlockingIOError:
                pass
            except OSError:
                raise Gone() from None
            if not poller.poll(self.timeout * 1000):
                raise Gone()                    # qmail: safewrite() _exit(1)s, no reply

    def _raw_read(self, deadline: float) -> bytes | None:
        poller = select.poll()
        poller.register(self.rfd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if poller.poll(left * 1000):
                try:
                    return os.read(self.rfd, STDIO_READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    return b""

    def read(self, deadline: float) -> bytes | None:
        """Bytes from the client; None when the deadline passed."""
        self.flush()
        if self.tls is None:
            return self._raw_read(deadline)
        import ssl
        while True:
            try:
                return self.tls.read(STDIO_READ_SIZE)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLError):
                return b""
            pending = self.outgoing.read()
            if pending:
                self._send(memoryview(pending))
            data = self._raw_read(deadline)
            if not data:
                return data
            self.incoming.write(data)

    def start_tls(self, ctx: ssl.SSLContext | None, deadline: float) -> bool:
        """The server side of the handshake over the two descriptors."""
        import ssl
        if ctx is None:
            return False
        self.flush()
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = self.outgoing.read()
                if pending:
                    self._send(memoryview(pending))
                data = self._raw_read(deadline)
                if not data:
                    return False
                self.incoming.write(data)
            except (ssl.SSLError, OSError) as err:
                self.log(f"TLS handshake failed: {err}")
                return False
        pending = self.outgoing.read()
        if pending:
            self._send(memoryview(pending))
        self.tls = tls
        return True


class Driver:
    """Carries out one session's events on fd 0/1 (blocking: one process per connection)."""

    def __init__(self, conn: SessionSetup, io: Stdio, qmail_dir: str, env: Mapping[str, str],
                 log: Callable[[str], None]):
        self.conn, self.io, self.qmail_dir, self.env, self.log = conn, io, qmail_dir, env, log
        self.session = conn.session
        self.queue: QueueProcess | None = None

    def carry_out(self, pending: list[Any]) -> int | None:
        """Every event, the callbacks' events too; the exit status once it is over."""
        session, io = self.session, self.io
        while pending:
            ev = pending.pop(0)
            kind = type(ev)
            if kind is E.Reply:
                io.out.append(ev.data)
            elif kind is E.QueueData:
                assert self.queue is not None
                self.queue.put(ev.data)
            elif kind is E.Log:
                self.log(ev.text)
            elif kind is E.QueueOpen:
                from .queue import QueueProcess
                self.queue = QueueProcess(self.conn.queue_program, self.qmail_dir)
                pending[:0] = session.queue_opened(self.queue.start())
            elif kind is E.QueueClose:
                io.flush()
                assert self.queue is not None
                status, failed = self.queue.close(ev.envelope)
                self.queue = None
                pending[:0] = session.queue_closed(status, failed)
            elif kind is E.QueueAbort:
                self.abort()
            elif kind is E.Pause:                  # the tarpit: what is owed goes first
                io.flush()
                time.sleep(ev.seconds)
            elif kind is E.Close:
                io.flush()
                return 0 if session.quit else 1    # qmail: only QUIT exits 0
            elif kind is E.StartTls:
                if not io.start_tls(self.conn.tls,
                                    time.monotonic() + self.conn.controls.timeout):
                    return 1
                pending[:0] = session.tls_started()
            elif kind is E.CheckPassword:
                from .secure import check, timeout_of
                io.flush()
                assert self.conn.checkpassword is not None
                code = check(self.conn.checkpassword, ev.user, ev.password,
                             timeout_of(self.env))
                pending[:0] = session.auth_result(code)
        return None

    def abort(self) -> None:
        if self.queue is not None:
            self.queue.abort()
            self.queue = None


def run(qmail_dir: str, env: Mapping[str, str], rfd: int = 0, wfd: int = 1,
        log: Callable[[str], None] | None = None) -> int:
    if log is None:
        from .prog import log as default_log
        log = default_log
    try:
        conn = SessionSetup(qmail_dir, env, IpMe())
    except ControlError as err:
        log(f"unable to read controls: {err}")
        try:
            os.write(wfd, R_CONTROLS)
        except OSError:
            pass
        return 1
    io = Stdio(rfd, wfd, conn.controls.timeout, log)
    session = conn.session
    driver = Driver(conn, io, qmail_dir, env, log)
    started = time.monotonic()
    pending = session.start()
    try:
        while True:
            code = driver.carry_out(pending)
            if code is not None:
                return code
            if session.pending:                 # the next batch, once these are sent
                io.flush()
                pending = session.proceed()
                continue
            # the session wants input; qmail's deadline is per read
            data = io.read(session.deadline)
            pending = session.check_timeout() if data is None else session.receive_data(data)
    except Gone:
        return 1
    finally:
        driver.abort()
        conn.close()
        textfile = env.get("METRICS_TEXTFILE")
        if textfile:                    # the totals of every session, for node-exporter
            from ..serving.metrics import accumulate, cdb_header
            try:
                note = accumulate(textfile, session.counts, session.end_reason,
                                  time.monotonic() - started,
                                  cdb_header(env.get("VALIDRCPTTO_CDB") or ""))
            except OSError as err:
                note = f"{err.strerror or err}"
            if note:
                log(f"METRICS_TEXTFILE {textfile}: {note}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:                     # under tcpserver: no option parsing at all
        sys.exit(run(os.environ.get("QMAIL_DIR") or "/var/qmail", os.environ))
    from .master import main as server_main
    from .master import parse_args
    opts = parse_args(argv)
    if opts.listen is not None:
        server_main(opts)
        return
    sys.exit(run(opts.qmail_dir, os.environ))
