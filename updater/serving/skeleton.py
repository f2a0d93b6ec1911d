"""The one server skeleton both long-running servers use (Postfix's ``single_server_main``):
``open_server`` binds the listening sockets and the /metrics server (exit 111 when
either cannot be had), loads what must be loaded while the installation is still
readable, and gives up root; ``serve`` runs the asyncio loop: each socket accepting
with the server's protocol, the periodic sweep, SIGHUP (read again) and SIGTERM /
SIGINT (stop accepting; the server's ``drain`` ends its connections), the loop's errors
as one line each.  The server hands it a ``Service``: its protocol factory, sweep,
reload and drain; validrcptto-smtpd's master forks its workers around this, each
running ``serve``."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..limits import SERVING_SWEEP
from .loop import every, one_line_errors, stop_on_signals
from .privileges import become


class Service(Protocol):
    """What a server hands the skeleton."""

    def protocol(self) -> asyncio.Protocol: ...

    def sweep(self, now: float) -> None:
        """Every SERVING_SWEEP seconds: end what overstayed (monotonic ``now``)."""

    def reload(self) -> None:
        """SIGHUP."""

    async def drain(self) -> None:
        """After SIGTERM, once no new connection is accepted: end the open ones."""


@dataclass
class Opened:
    socks: list[socket.socket]
    httpd: Any                      # the /metrics server (None: none)


def open_server(prog: str, log: Callable[[str], None], listen: str,
                bind: Callable[[], list[socket.socket]], metrics: str,
                serve_metrics: Callable[[], Any], user: str,
                preload: Callable[[], None] = lambda: None) -> Opened:
    """Bind (as root for a low port), the /metrics server, ``preload`` (what must be
    loaded before ``user``: the Python installation may be root's), then become
    ``user`` (its uid and gid, no other groups); running on as root is warned about.
    A socket that cannot be had (``listen``, ``metrics``: the addresses asked for, for
    the message; no ``metrics``: no /metrics server) exits 111, as qmail's servers do."""
    try:
        socks = bind()
    except (OSError, ValueError, KeyError) as err:
        sys.stderr.write(f"{prog}: cannot listen on {listen}: {err}\n")
        sys.exit(111)
    httpd = None
    if metrics:
        try:
            httpd = serve_metrics()
        except (OSError, ValueError) as err:
            sys.stderr.write(f"{prog}: cannot serve metrics on {metrics}: {err}\n")
            sys.exit(111)
    import cdbx  # noqa: F401  (every server reads cdbs)
    preload()
    if user:
        become(user, prog)
    elif os.geteuid() == 0:
        log("WARNING: running as root without --user (give --user, or the service's "
            "env/ its user)")
    return Opened(socks, httpd)


async def serve(service: Service, socks: list[socket.socket], log: Callable[[str], None],
                started: Callable[[], None] = lambda: None) -> None:
    """The loop of one server process, until SIGTERM / SIGINT and the drain."""
    loop = asyncio.get_running_loop()
    one_line_errors(loop, log)
    servers = [await loop.create_server(service.protocol, sock=s) for s in socks]
    every(loop, SERVING_SWEEP, lambda: service.sweep(time.monotonic()))
    started()
    for s in socks:
        name = s.getsockname()
        log("listening on " + (name if isinstance(name, str) else f"{name[0]}:{name[1]}"))
    stop = stop_on_signals(loop, service.reload)
    await stop.wait()
    for srv in servers:
        srv.close()                              # no new connections
    await service.drain()
    log("stopped")


def run(service: Service, socks: list[socket.socket], log: Callable[[str], None],
        started: Callable[[], None] = lambda: None) -> int:
    try:
        asyncio.run(serve(service, socks, log, started))
    except KeyboardInterrupt:
        pass
    return 0
