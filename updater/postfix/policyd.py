"""validrcptto-policyd: validrcptto.cdb for Postfix, as a policy service and a socketmap.

One asyncio loop; each connection is a ``postfix.Conversation`` (the protocol is told
apart by its first byte, so one listener serves both).  The answer is the checker's
(``checker.check``) over a private snapshot of the cdb (``smtp.cdbfile``: replaced or
rewritten files are picked up at the next request, a torn one is never read), for the
domains of qmail's rcpthosts / morercpthosts.cdb (qmail-smtpd's own rule: without an
rcpthosts file every domain is ours).  Bounded: requests (64 KiB), connections
(``--max-connections``), idle connections (``--idle-timeout``), and the replies a client
leaves unread (reading stops, and it is dropped after ``--idle-timeout``).

Lifecycle: bind (``--listen`` HOST:PORT or unix:PATH, several allowed), then
``--user``; SIGHUP re-reads rcpthosts; SIGTERM closes the listeners and the idle
connections, gives busy ones a second, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__, declare
from ..checker import check
from ..declare import qmail_home, setting
from ..limits import POLICYD_LOG_RATE, WRITE_HIGH
from ..serving import skeleton
from ..serving.cdbfile import CdbCache
from ..serving.controlfiles import ControlError, morercpthosts_path, readfile
from ..serving.listeners import RateLog, bind
from ..serving.logline import logger
from ..serving.options import add_params
from ..serving.watched import Watched
from ..smtp.addresses import rcpthosts_allows
from ..textsafe import escape
from .protocol import NOMAILBOX_ACTION, Answer, Conversation, PolicySettings, Reply

if TYPE_CHECKING:
    import http.server

PROG = "validrcptto-policyd"


log = logger(PROG)


def read_hosts(path: str) -> frozenset[bytes] | None:
    lines = readfile(path)
    return None if lines is None else frozenset(x.lower() for x in lines)


class Lookup:
    """address -> Answer, with the cdb snapshot, rcpthosts and morercpthosts.cdb read
    again when they change (rcpthosts: ``Watched``, as validrcptto-smtpd --listen)."""

    def __init__(self, cdb: str, qmail_dir: str):
        self.cdb = CdbCache(cdb, log, need_records=True)
        path = os.path.join(qmail_dir, "control", "rcpthosts")
        self.hosts = Watched([path], lambda: read_hosts(path), log, "rcpthosts")
        self.more = CdbCache(morercpthosts_path(qmail_dir), log)
        self.cdb_path = cdb

    def reload(self) -> None:
        self.hosts.forget()
        self.cdb.forget()
        self.more.forget()

    def __call__(self, address: bytes) -> Answer:
        try:
            hosts = self.hosts.current()
            more = None
            if hosts is not None:
                try:
                    more = self.more.current()
                except FileNotFoundError:
                    more = None
        except (ControlError, OSError) as err:
            return Answer(None, address, unavailable=f"cannot read the controls: {err}")
        if not rcpthosts_allows(address, hosts, more):
            return Answer(None, address)
        try:
            getter = self.cdb.current()
        except OSError as err:
            return Answer(None, address, unavailable=f"{self.cdb_path}: {err.strerror or err}")
        verdict = check(getter, address)
        return Answer(verdict.accepted, address, verdict.key)


class Counts:
    """What the service answered, for --metrics (one process: plain numbers)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.errors = 0

    def add(self, kind: str, result: str) -> None:
        self.requests[kind, result] = self.requests.get((kind, result), 0) + 1


class Server:
    def __init__(self, opts: PolicydOptions, lookup: Lookup):
        self.o, self.lookup = opts, lookup
        self.counts = Counts()
        reject = opts.reject_action
        if opts.reply == "550" and reject == PolicySettings.reject:
            reject = NOMAILBOX_ACTION
        self.settings = PolicySettings(reject=reject, unavailable=opts.unavailable_action,
                                 map_name=opts.map_name.encode())
        self.conns: set[PolicyProtocol] = set()
        self.serial = 0
        self.logs = RateLog(POLICYD_LOG_RATE, log)

    # ---- what the serving skeleton asks of a server (skeleton.Service)
    def protocol(self) -> PolicyProtocol:
        return PolicyProtocol(self)

    def sweep(self, now: float) -> None:
        """Idle connections and requests trickled in too slowly are closed."""
        limit, begun = now - self.o.idle_timeout, now - self.o.request_timeout
        for c in list(self.conns):
            if c.last < limit:
                c.transport.abort()
            elif c.partial_since is not None and c.partial_since < begun:
                self.logs.line(f"{c.id} {c.peer}: request not complete within "
                               f"{self.o.request_timeout:g}s of its first byte; closing")
                c.transport.abort()
        self.logs.flush()

    def reload(self) -> None:
        self.lookup.reload()
        log("SIGHUP: re-reading rcpthosts and the cdb")

    async def drain(self) -> None:
        await asyncio.sleep(1.0)                      # answers in flight go out
        for c in list(self.conns):
            c.transport.abort()

    def note(self, conn: PolicyProtocol, reply: Reply) -> None:
        a = reply.answer
        if reply.error:
            self.counts.errors += 1
            self.logs.line(f"{conn.id} {conn.peer}: {reply.error}; closing")
            return
        self.counts.add(conn.kind, "dunno" if a is None else "unavailable" if a.unavailable
                        else "not_ours" if a.accepted is None
                        else "accept" if a.accepted else "reject")
        if a is None or self.o.verbose == 0:
            return
        if a.unavailable:
            self.logs.line(f"{conn.id} {conn.kind}: {escape(a.address)}: unavailable: "
                           f"{a.unavailable}")
        elif a.accepted is False and self.o.verbose >= 1:
            key = "no key" if a.key is None else f"key {escape(a.key)}"
            self.logs.line(f"{conn.id} {conn.kind}: reject {escape(a.address)} ({key})")
        elif self.o.verbose >= 2:
            what = "not ours" if a.accepted is None else "accept"
            key = "" if a.key is None else f" (key {escape(a.key)})"
            self.logs.line(f"{conn.id} {conn.kind}: {what} {escape(a.address)}{key}")


class PolicyProtocol(asyncio.Protocol):
    transport: asyncio.Transport               # set by connection_made, first of all

    def __init__(self, server: Server):
        self.s = server
        self.conv = Conversation(server.lookup, server.settings)
        self.last = time.monotonic()
        self.paused = False
        self.scheduled = False
        self.partial_since: float | None = None      # when an incomplete request began
        self.id = 0
        self.peer = "?"

    @property
    def kind(self) -> str:
        return self.conv.kind or "-"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        s = self.s
        s.serial += 1
        self.id = s.serial
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if len(s.conns) >= s.o.max_connections:
            log(f"{self.id} {self.peer}: more than {s.o.max_connections} connections; closing")
            transport.abort()
            return
        s.conns.add(self)
        transport.set_write_buffer_limits(high=WRITE_HIGH)

    def connection_lost(self, exc: Exception | None) -> None:
        self.s.conns.discard(self)

    def data_received(self, data: bytes) -> None:
        self.last = time.monotonic()
        if self.partial_since is None:
            self.partial_since = self.last
        self.answer(data)

    def answer(self, data: bytes = b"") -> None:
        """Answer a batch; while whole requests still wait, stop reading and come back
        on the next turn of the loop (other clients go first), or once the client has
        read enough of its answers."""
        self.scheduled = False
        if self.transport.is_closing():
            return                                   # nobody to answer: no work
        try:
            replies = self.conv.receive_data(data) if data else self.conv.proceed()
        except Exception as err:                     # a bug: this connection ends, not us
            log(f"{self.id} {self.peer}: {type(err).__name__}: {err}; closing")
            self.transport.abort()
            return
        for reply in replies:
            if self.transport.is_closing():          # the client went away mid-batch
                return
            self.s.note(self, reply)
            if reply.data:
                self.transport.write(reply.data)
            if reply.close:
                self.transport.close()
                return
        if not self.conv.partial:
            self.partial_since = None
        elif replies:                                # a request ended: the next began
            self.partial_since = time.monotonic()
        if self.conv.more:
            self.transport.pause_reading()
            if not self.paused:
                self.scheduled = True
                asyncio.get_running_loop().call_soon(self.answer)
        elif not self.paused:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:                  # the client does not read
        self.paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        self.last = time.monotonic()
        if self.conv.more:
            if not self.scheduled:
                self.scheduled = True
                asyncio.get_running_loop().call_soon(self.answer)
        else:
            self.transport.resume_reading()


def metrics_collector(server: Server) -> Any:
    """/metrics: requests by protocol and result, bad requests, open connections, and
    the cdb snapshot in use."""
    class Collector:
        def collect(self) -> Iterator[Any]:
            from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

            from ..serving.metrics import cdb_gauges
            fam = CounterMetricFamily("validrcptto_policyd_requests",
                                      "lookups answered, by protocol and result",
                                      labels=["protocol", "result"])
            for kind in ("policy", "socketmap"):
                for result in ("accept", "reject", "not_ours", "unavailable", "dunno"):
                    fam.add_metric([kind, result], server.counts.requests.get((kind, result), 0))
            yield fam
            yield CounterMetricFamily("validrcptto_policyd_bad_requests",
                                      "connections closed for a malformed request",
                                      value=server.counts.errors)
            yield GaugeMetricFamily("validrcptto_policyd_connections_open",
                                    "connections open now", value=len(server.conns))
            cdb = server.lookup.cdb
            for name, _, text, _, ((_, value),) in cdb_gauges(cdb.entries, cdb.mtime):
                yield GaugeMetricFamily(name, text, value=value)
    return Collector()


def serve(opts: PolicydOptions, socks: list[socket.socket],
          httpd: http.server.ThreadingHTTPServer | None = None) -> int:
    server = Server(opts, Lookup(opts.cdb, opts.qmail_dir))
    if httpd is not None:
        httpd.RequestHandlerClass.registry.register(  # type: ignore[attr-defined]
            metrics_collector(server))
        import threading
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return skeleton.run(server, socks, log)


@dataclass
class PolicydOptions:
    """validrcptto-policyd's options, each declared once (``declare.setting``)."""
    listen: list[str] | None = setting(
        None, flag="--listen", metavar="ADDR", env="LISTEN", repeat=True,
        help="HOST:PORT or unix:PATH to listen on (may be given more than once; required; the "
        "variable: separated by spaces)")
    qmail_dir: str = qmail_home(
        "qmail's home: control/rcpthosts and morercpthosts.cdb say which domains are ours")
    cdb: str = setting(
        "", flag="--cdb", metavar="CDB", env="VALIDRCPTTO_CDB",
        help="the list (default: QMAIL_DIR/control/validrcptto.cdb)")
    reject_action: str = setting(
        PolicySettings.reject, flag="--reject-action", metavar="TEXT", env="REJECT_ACTION",
        help="policy answer for a refused recipient ({address} is replaced by the recipient; "
        "Postfix itself puts \"<ADDRESS>: Recipient address rejected:\" before the text)")
    reply: str = setting(
        "553", flag="--reply", metavar="CODE", env="VALIDRCPTTO_REPLY", choices=("550", "553"),
        help="550: refuse with qmail's words (550 5.1.1 sorry, no mailbox here by that "
        "name) where no --reject-action is given, as validrcptto-smtpd does; 553: the "
        "reject action as it is")
    unavailable_action: str = setting(
        PolicySettings.unavailable, flag="--unavailable-action", metavar="TEXT",
        env="UNAVAILABLE_ACTION",
        help="policy answer when the cdb cannot be read")
    map_name: str = setting(
        "validrcptto", flag="--map-name", metavar="NAME", env="MAP_NAME",
        help="the socketmap's name")
    max_connections: int = setting(
        200, flag="--max-connections", metavar="N", env="MAX_CONNECTIONS",
        help="connections in all")
    idle_timeout: float = setting(
        600.0, flag="--idle-timeout", metavar="SECONDS", env="IDLE_TIMEOUT",
        help="a connection idle this long (or leaving answers unread) is closed")
    request_timeout: float = setting(
        10.0, flag="--request-timeout", metavar="SECONDS", env="REQUEST_TIMEOUT",
        help="a request must be complete this long after its first byte (a trickling client "
        "is closed)")
    socket_mode: str = setting(
        "0660", flag="--socket-mode", metavar="MODE", env="SOCKET_MODE",
        help="mode of unix: sockets")
    socket_owner: str = setting(
        "", flag="--socket-owner", metavar="USER:GROUP", env="SOCKET_OWNER",
        help="owner of unix: sockets (default: the starting user)")
    user: str = setting(
        "", flag="--user", metavar="NAME", env="POLICYD_USER",
        help="run as this account once bound")
    metrics: str = setting(
        "", flag="--metrics", metavar="HOST:PORT", env="METRICS",
        help="serve Prometheus metrics at http://HOST:PORT/metrics")
    verbose: int = setting(
        1, flag="--verbose", metavar="N", env="VERBOSE",
        help="log: 0 errors only, 1 also each refusal, 2 every decision")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="validrcptto.cdb for Postfix: a policy service "
        "(check_policy_service) and a socketmap (relay_recipient_maps), told apart by the "
        "first byte of each connection.",
        epilog="exit status: 0 after SIGTERM, 111 if it cannot listen or become --user, "
        "2 usage")
    add_params(p, PolicydOptions)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    ns = p.parse_args(sys.argv[1:] if argv is None else argv)
    opts = declare.load(PolicydOptions, ns, os.environ, p.error)
    if not opts.listen:
        p.error("--listen (or $LISTEN) is required")
    opts.qmail_dir = os.path.abspath(opts.qmail_dir)
    opts.cdb = opts.cdb or os.path.join(opts.qmail_dir, "control", "validrcptto.cdb")
    listen = opts.listen

    def serve_metrics() -> Any:
        from ..serving.metrics import bind as bind_metrics
        from ..serving.metrics import http_server
        return http_server(bind_metrics(opts.metrics))
    opened = skeleton.open_server(
        PROG, log, " ".join(listen),
        lambda: [bind(spec, int(opts.socket_mode, 8), opts.socket_owner) for spec in listen],
        opts.metrics, serve_metrics, opts.user)
    sys.exit(serve(opts, opened.socks, opened.httpd))
