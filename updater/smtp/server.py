"""validrcptto-smtpd --listen HOST:PORT: one asyncio event loop driving a
``session.Session`` per connection (no threads, no select() fd limit).

Per connection it does what tcpserver + qmail-smtpd do: read the control files and
open the cdb afresh (a renamed-in cdb takes effect at the next connection), set
TCPREMOTEIP/TCPREMOTEPORT/TCPLOCALIP/TCPLOCALPORT, time out reads and writes after
control/timeoutsmtpd, and stream DATA into qmail-queue.  ``--max-connections`` caps the
sessions: past it, new clients get ``421`` and are closed.  accept() running out of
descriptors is handled by asyncio (logged, retried after a pause), never fatal.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

from . import session as S
from .controls import Connection, ControlError, IpMe

PROG = "validrcptto-smtpd"
READ_SIZE = 65536
R_BUSY = b"421 too many connections, try again later (#4.3.2)\r\n"


def log(text: str) -> None:
    sys.stderr.write(f"{PROG}[{os.getpid()}]: {text}\n")
    sys.stderr.flush()


class AsyncQueue:
    """qmail-queue from the event loop: message on its fd 0 (a pipe we drain), the
    envelope on its fd 1 at the end."""

    def __init__(self, program: str, qmail_dir: str):
        self.program, self.qmail_dir = program, qmail_dir
        self.proc = None
        self.env_w = -1
        self.status: int | None = 0
        self.write_failed = False

    async def start(self) -> int | None:
        try:
            e_r, self.env_w = os.pipe2(os.O_CLOEXEC)
        except OSError:
            return None
        try:
            self.proc = await asyncio.create_subprocess_exec(
                self.program, stdin=asyncio.subprocess.PIPE, stdout=e_r, cwd=self.qmail_dir)
        except OSError as err:
            self.status = 61 if err.filename == self.qmail_dir else 120
        finally:
            os.close(e_r)
        return self.proc.pid if self.proc is not None else os.getpid()

    async def put(self, data: bytes) -> None:
        if self.proc is None or self.write_failed:
            self.write_failed = True
            return
        try:
            self.proc.stdin.write(data)
            await self.proc.stdin.drain()
        except (OSError, RuntimeError):
            self.write_failed = True

    async def close(self, envelope: bytes | None) -> tuple[int | None, bool]:
        if self.proc is not None:
            self.proc.stdin.close()
        if envelope is not None and self.proc is not None and not self.write_failed:
            fd = self.env_w

            def write_all() -> bool:
                view = memoryview(envelope)
                try:
                    while view:
                        view = view[os.write(fd, view):]
                    return True
                except OSError:
                    return False
            if not await asyncio.get_running_loop().run_in_executor(None, write_all):
                self.write_failed = True
        self._close_env()
        if self.proc is None:
            return self.status, self.write_failed
        code = await self.proc.wait()
        return (None if code < 0 else code), self.write_failed

    async def abort(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
        self._close_env()
        if self.proc is not None:
            await self.proc.wait()

    def _close_env(self) -> None:
        if self.env_w != -1:
            os.close(self.env_w)
            self.env_w = -1


class Server:
    def __init__(self, qmail_dir: str, env: dict[str, str], max_connections: int):
        self.qmail_dir, self.env = qmail_dir, env
        self.max = max_connections
        self.active = 0
        self.ipme = IpMe()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        peer = writer.get_extra_info("peername") or ("unknown", 0)
        local = writer.get_extra_info("sockname") or ("unknown", 0)
        if self.active >= self.max:
            writer.write(R_BUSY)
            await self._close(writer, 5)
            return
        self.active += 1
        try:
            await self.session(reader, writer, peer, local)
        except Exception as err:                          # never takes the server down
            log(f"session {peer[0]} ended by {type(err).__name__}: {err}")
        finally:
            self.active -= 1
            await self._close(writer, 5)

    async def _close(self, writer, timeout: float) -> None:
        try:
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), timeout)
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()

    async def session(self, reader, writer, peer, local) -> None:
        env = dict(self.env)
        env.update(TCPREMOTEIP=peer[0], TCPREMOTEPORT=str(peer[1]),
                   TCPLOCALIP=local[0], TCPLOCALPORT=str(local[1]))
        try:
            conn = Connection(self.qmail_dir, env, self.ipme)
        except ControlError as err:
            log(f"unable to read controls: {err}")
            writer.write(b"421 unable to read controls (#4.3.0)\r\n")
            return
        try:
            await self.converse(reader, writer, conn)
        finally:
            conn.close()

    async def converse(self, reader, writer, conn: Connection) -> None:
        session, program = conn.session, conn.queue_program
        timeout = conn.controls.timeout
        queue: AsyncQueue | None = None
        pending = session.start()
        try:
            while True:
                while pending:
                    ev = pending.pop(0)
                    kind = type(ev)
                    if kind is S.Reply:
                        writer.write(ev.data)
                    elif kind is S.QueueData:
                        await queue.put(ev.data)
                    elif kind is S.Log:
                        log(ev.text)
                    elif kind is S.QueueOpen:
                        queue = AsyncQueue(program, self.qmail_dir)
                        pending[:0] = session.queue_opened(await queue.start())
                    elif kind is S.QueueClose:
                        await asyncio.wait_for(writer.drain(), timeout)
                        status, failed = await queue.close(ev.envelope)
                        queue = None
                        pending[:0] = session.queue_closed(status, failed)
                    elif kind is S.QueueAbort:
                        if queue is not None:
                            await queue.abort()
                            queue = None
                    elif kind is S.Close:
                        await asyncio.wait_for(writer.drain(), timeout)
                        return
                await asyncio.wait_for(writer.drain(), timeout)
                left = session.deadline - time.monotonic()
                try:
                    data = await asyncio.wait_for(reader.read(READ_SIZE), max(left, 0))
                except asyncio.TimeoutError:
                    pending = session.check_timeout()
                    continue
                except OSError:
                    data = b""
                pending = session.receive_data(data)
        finally:
            if queue is not None:
                await queue.abort()


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(qmail_dir: str, listen: str, max_connections: int) -> None:
    host, port = parse_listen(listen)
    srv = Server(qmail_dir, dict(os.environ), max_connections)
    server = await asyncio.start_server(srv.handle, host, port, limit=READ_SIZE,
                                        reuse_address=True, backlog=256)
    addr = server.sockets[0].getsockname()
    log(f"listening on {addr[0]}:{addr[1]}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    log("stopped")


USAGE = ("usage: validrcptto-smtpd --listen HOST:PORT [--qmail-dir DIR] "
         "[--max-connections N]\n")


def main(argv: list[str]) -> None:
    qmail_dir = os.environ.get("QMAIL_DIR") or "/var/qmail"
    listen = None
    max_connections = 500
    i = 0
    while i < len(argv):
        a = argv[i]
        name, eq, value = a.partition("=")
        if name in ("--qmail-dir", "--listen", "--max-connections"):
            if not eq:
                if i + 1 >= len(argv):
                    sys.stderr.write(f"{PROG}: {name} needs a value\n" + USAGE)
                    sys.exit(2)
                value, i = argv[i + 1], i + 1
            if name == "--qmail-dir":
                qmail_dir = value
            elif name == "--listen":
                listen = value
            else:
                max_connections = S.scan_ulong(value) or 1
            i += 1
        else:
            sys.stderr.write(f"{PROG}: bad argument {a!r}\n" + USAGE)
            sys.exit(2)
    try:
        asyncio.run(serve(qmail_dir, listen, max_connections))
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError) as err:
        sys.stderr.write(f"{PROG}: cannot listen on {listen}: {err}\n")
        sys.exit(111)
