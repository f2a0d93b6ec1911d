"""The hand-off to qmail-queue, as qmail.c does it: the message streamed into fd 0 while
it arrives, the envelope on fd 1 at the end, the exit status mapped by the session
(``session.qq_reply``).  No temporary files; memory is one pipe buffer.

Blocking (for the tcpserver front end, one process per connection).  The ``--listen``
server drives the same pipes from its event loop.
"""

from __future__ import annotations

import os


class QueueProcess:
    """One qmail-queue run.  ``start`` never raises: a program that cannot be started
    behaves like qmail's child that _exit(120)s (``unable to exec qq``), a qmail home
    that cannot be entered like _exit(61)."""

    def __init__(self, program: str, qmail_dir: str):
        self.program, self.qmail_dir = program, qmail_dir
        self.proc = None
        self.msg_fd = self.env_fd = -1
        self.status: int | None = 0
        self.write_failed = False

    def start(self) -> int | None:
        """Start it; returns its pid (the ``qp``), or None if no pipe/process at all
        (qmail's ``qqt failure``)."""
        import subprocess
        try:
            m_r, m_w = os.pipe2(os.O_CLOEXEC)
            e_r, e_w = os.pipe2(os.O_CLOEXEC)
        except OSError:
            return None
        try:
            self.proc = subprocess.Popen([self.program], stdin=m_r, stdout=e_r,
                                         cwd=self.qmail_dir, close_fds=True)
        except OSError as err:
            import errno
            self.status = 61 if err.filename == self.qmail_dir and \
                err.errno in (errno.ENOENT, errno.EACCES, errno.ENOTDIR) else 120
        finally:
            os.close(m_r)
            os.close(e_r)
        self.msg_fd, self.env_fd = m_w, e_w
        return self.proc.pid if self.proc is not None else os.getpid()

    def _write(self, fd: int, data: bytes) -> None:
        if self.write_failed or self.proc is None:
            self.write_failed = True
            return
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError:
            self.write_failed = True

    def put(self, data: bytes) -> None:
        self._write(self.msg_fd, data)

    def close(self, envelope: bytes | None) -> tuple[int | None, bool]:
        """End the message; returns (exit status or None if killed, write failed)."""
        self._close_fd("msg_fd")
        if envelope is not None:
            self._write(self.env_fd, envelope)
        self._close_fd("env_fd")
        if self.proc is None:
            return self.status, self.write_failed
        code = self.proc.wait()
        return (None if code < 0 else code), self.write_failed

    def abort(self) -> None:
        """The client is gone mid-message: close both pipes (qmail-queue sees a message
        without envelope and gives up) and reap it."""
        self._close_fd("msg_fd")
        self._close_fd("env_fd")
        if self.proc is not None:
            self.proc.wait()

    def _close_fd(self, name: str) -> None:
        fd = getattr(self, name)
        if fd != -1:
            setattr(self, name, -1)
            try:
                os.close(fd)
            except OSError:
                pass
