"""A child process the ``--listen`` server owns until it is reaped.

qmail-queue and checkpassword run as children of a long-running worker, so every path
out of a session (the end, an error, a time-out, the client hanging up, the task being
cancelled, SIGTERM) must leave neither a zombie nor a descriptor behind.  ``Child``
holds the pid and its pidfd and keeps both until the exit status is collected:

- ``await wait(timeout)``: the exit status, from the event loop (no thread, no blocking
  waitpid); None on time-out, and the child is still owned.
- ``kill()``: SIGKILL, then reap: at once if it is already gone, else from the event
  loop when its pidfd turns readable (a callback, not a task that could be cancelled).
  Idempotent; after it the pidfd is closed exactly once.

Without pidfds (Linux < 5.3) the same is done by polling waitpid(WNOHANG).
"""

from __future__ import annotations

import os
import signal

LIVE: set[Child] = set()          # every child not reaped yet (tests and shutdown)


class Child:
    def __init__(self, pid: int):
        self.pid = pid
        self.status: int | None = None     # waitpid status once reaped
        self.reaped = False
        self.watched = False               # its pidfd is registered with an event loop
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:
            self.pidfd = -1
        LIVE.add(self)

    # ---- collecting
    def poll(self) -> bool:
        """Reap it if it has ended; True once reaped."""
        if self.reaped:
            return True
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:           # reaped by someone else: nothing to hold
            pid, status = self.pid, -1
        if pid == 0:
            return False
        self._done(status)
        return True

    def _done(self, status: int) -> None:
        self.reaped = True
        self.status = status
        LIVE.discard(self)
        if self.pidfd != -1:
            fd, self.pidfd = self.pidfd, -1
            if self.watched:
                import asyncio
                try:
                    asyncio.get_running_loop().remove_reader(fd)
                except (RuntimeError, ValueError, OSError):
                    pass
            os.close(fd)

    def wait_blocking(self) -> None:
        """Reap it, waiting as long as it takes (the tcpserver front end: one process
        per connection, nothing else to do meanwhile)."""
        if self.reaped:
            return
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = -1
        self._done(status)

    def exit_code(self) -> int | None:
        """qmail's view: the exit code, or None when it was killed by a signal."""
        if not self.reaped or self.status is None or self.status < 0:
            return None
        return os.WEXITSTATUS(self.status) if os.WIFEXITED(self.status) else None

    async def wait(self, timeout: float | None = None) -> bool:
        """True once reaped; False when ``timeout`` passed first (still owned)."""
        import asyncio
        if self.poll():
            return True
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        if self.pidfd != -1:
            fd = self.pidfd
            self.watched = True
            def wake() -> None:
                if not ready.done():
                    ready.set_result(None)
            loop.add_reader(fd, wake)
            try:
                await asyncio.wait_for(ready, timeout)
            except TimeoutError:
                return False
            finally:
                if self.pidfd == fd:
                    loop.remove_reader(fd)
            return self.poll()
        deadline = None if timeout is None else loop.time() + timeout
        while not self.poll():
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    # ---- ending
    def kill(self) -> None:
        """SIGKILL it and make sure it is reaped, without blocking the event loop."""
        if self.poll():
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.poll():
            return
        import asyncio
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:                # no loop (shutdown): a killed child dies now
            try:
                _, status = os.waitpid(self.pid, 0)
            except ChildProcessError:
                status = -1
            self._done(status)
            return
        if self.pidfd != -1:
            self.watched = True
            loop.add_reader(self.pidfd, self.poll)
        else:
            def again() -> None:
                if not self.poll():
                    loop.call_later(0.01, again)
            loop.call_later(0.01, again)


def spawn(program: str, argv: list[str], env: dict[str, str],
          file_actions: list[tuple[int, ...]]) -> Child:
    """posix_spawn (no fork of the big worker, no helper thread); OSError as it raises."""
    return Child(os.posix_spawn(program, argv, env, file_actions=file_actions))


PR_SET_PDEATHSIG = 1


def end_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """In a forked worker: have the kernel send ``sig`` when the process that forked it
    ends, however it ends (``kill -9`` of the master included), so no worker outlives
    its master and keeps serving beside the next one's; SIGTERM lets the worker finish
    its sessions within the grace period.  If the master is already gone (it died
    between the fork and this call), exit now."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        os._exit(0)
