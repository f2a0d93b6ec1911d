"""The hand-off to qmail-queue, as qmail.c does it: the message streamed into fd 0 while
it arrives, the envelope on fd 1 at the end, the exit status mapped by the session
(``session.qq_reply``).  No temporary files; memory is one pipe buffer.

Both front ends start it with ``launch``; ``QueueProcess`` then blocks (the tcpserver
front end, one process per connection), ``AsyncQueue`` drives the same pipes from the
``--listen`` server's event loop (asyncio is imported only there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..serving.child import Child, spawn


def launch(program: str, qmail_dir: str, env: Mapping[str, str]
           ) -> tuple[Child | None, int, int, int | None]:
    """qmail-queue started the one way both front ends start it: posix_spawn (no fork of
    a big process, no helper thread, no subprocess import), fd 0 and 1 pipes whose write
    ends we keep, run in QMAIL_DIR (posix_spawn cannot chdir: this process moves there
    first).  Returns (the child or None, message fd, envelope fd, the exit status qmail
    gives a start that failed: 61 when QMAIL_DIR cannot be entered, 120 when the exec
    fails).  Raises OSError when there are no pipes (qmail's ``qqt failure``)."""
    m_r, m_w = os.pipe2(os.O_CLOEXEC)
    try:
        e_r, e_w = os.pipe2(os.O_CLOEXEC)
    except OSError:
        os.close(m_r)
        os.close(m_w)
        raise
    child, status = None, None
    try:
        if os.getcwd() != qmail_dir:
            os.chdir(qmail_dir)
        child = spawn(program, [program], dict(env),
                      [(os.POSIX_SPAWN_DUP2, m_r, 0), (os.POSIX_SPAWN_DUP2, e_r, 1)])
    except OSError as err:
        status = 61 if err.filename == qmail_dir else 120
    finally:
        os.close(m_r)
        os.close(e_r)
    return child, m_w, e_w, status


class QueueProcess:
    """One qmail-queue run, blocking.  ``start`` never raises: a program that cannot be
    started behaves like qmail's child that _exit(120)s (``unable to exec qq``), a qmail
    home that cannot be entered like _exit(61)."""

    def __init__(self, program: str, qmail_dir: str):
        self.program, self.qmail_dir = program, qmail_dir
        self.child: Child | None = None
        self.msg_fd = self.env_fd = -1
        self.status: int | None = 0
        self.write_failed = False

    def start(self) -> int | None:
        """Start it; returns its pid (the ``qp``), or None if no pipe at all (qmail's
        ``qqt failure``)."""
        try:
            self.child, self.msg_fd, self.env_fd, failed = \
                launch(self.program, self.qmail_dir, os.environ)
        except OSError:
            return None
        if self.child is None:
            self.status = failed
            self._close_fd("msg_fd")
            self._close_fd("env_fd")
            return os.getpid()
        return self.child.pid

    def _write(self, fd: int, data: bytes) -> None:
        if self.write_failed or self.child is None:
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
        if self.child is None:
            return self.status, self.write_failed
        self.child.wait_blocking()
        return self.child.exit_code(), self.write_failed

    def abort(self) -> None:
        """The client is gone mid-message: close both pipes (qmail-queue sees a message
        without envelope and gives up) and reap it."""
        self._close_fd("msg_fd")
        self._close_fd("env_fd")
        if self.child is not None:
            self.child.wait_blocking()

    def _close_fd(self, name: str) -> None:
        fd = getattr(self, name)
        if fd != -1:
            setattr(self, name, -1)
            try:
                os.close(fd)
            except OSError:
                pass


async def write_fd(fd: int, data: bytes) -> bool:
    """Write all of ``data`` to a pipe from the event loop (no thread); False when the
    reader went away."""
    import asyncio
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
            self.child, self.msg_w, self.env_w, failed = \
                launch(self.program, self.qmail_dir, self.env)
        except OSError:
            return None
        if self.child is None:
            self.status = failed
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
