"""validrcptto-smtpd --listen HOST:PORT: the long-running server, the recommended
deployment (no Python start-up per connection).  This is its master (Postfix's word):
the options, bind, the privilege drop and the worker processes; ``worker`` runs one
process, ``connection`` one connection, ``anvil`` the limits.

One asyncio event loop per worker process drives a ``session.Session`` per connection
(asyncio Protocols: no threads, no select() fd limit); ``--workers N`` processes share
the port with SO_REUSEPORT.  Per connection it does what ``tcpserver -x RULES`` +
qmail-smtpd do: tcpserver's rules (allow / deny / environment), the TCP* variables,
qmail-smtpd's controls, a snapshot of validrcptto.cdb that nothing on disk can pull from
under it (``cdbfile``), read and write time-outs (control/timeoutsmtpd), DATA streamed
into qmail-queue.  Bounded: ``--max-connections`` in all and ``--max-per-ip`` per client
(past either: ``421`` and close), a command line is at most 4 KiB, a read 64 KiB.  Out of
descriptors on accept: one log line, accepting pauses a second, sessions go on.

Lifecycle (``serving.skeleton``, which validrcptto-policyd shares): bind (as root for
port 25), then ``--user`` (its uid and gid, no supplementary groups); SIGHUP re-reads
the controls and the rules; SIGTERM stops accepting, lets sessions finish for
``--grace`` seconds, then answers the rest ``421`` between commands and closes them;
exit 0.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from typing import Any

from ..limits import LISTEN_BACKLOG, RESTART_PAUSE
from ..serving.anvil import Limits
from ..serving.child import end_with_parent
from ..serving.listeners import parse_listen
from ..serving.metrics import Metrics
from ..serving.skeleton import open_server
from .options import SmtpdOptions, parse_args
from .prog import PROG, log
from .worker import run_worker

__all__ = ["SmtpdOptions", "parse_args", "main"]


def bind(opts: SmtpdOptions, reuse_port: bool) -> socket.socket:
    from ..serving.netsock import listen_tcp
    _, host, port = parse_listen(opts.listen or "", unix=False)
    return listen_tcp(host, port, LISTEN_BACKLOG, reuse_port=reuse_port)


def fork_child(i: int, master: int, opts: SmtpdOptions, socks: list[socket.socket],
               limits: Limits, metrics: Metrics, httpd: Any) -> int:
    """Fork worker ``i`` (its socket only; -1: the /metrics server); the child never
    returns, and ends with the master."""
    pid = os.fork()
    if pid:
        return pid
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    end_with_parent(master)                     # SIGTERM when the master is gone
    if i == -1:
        for s in socks:
            s.close()
        httpd.serve_forever()
        os._exit(0)
    for j, s in enumerate(socks):
        if j != i:
            s.close()
    if httpd is not None:
        httpd.socket.close()
    limits.row = metrics.row = i
    os._exit(run_worker(opts, socks[i], limits, metrics))


def supervise_workers(opts: SmtpdOptions, socks: list[socket.socket], limits: Limits,
                      metrics: Metrics, httpd: Any = None) -> int:
    """The parent of ``--workers N``: starts them (and, with --metrics, a process that
    serves /metrics: this one forks, so it runs no threads), restarts one that dies,
    passes SIGTERM and SIGHUP on, and exits 0 once all have stopped after SIGTERM."""
    children: dict[int, int] = {}                    # pid -> index of its socket (-1: metrics)
    stopping, master = [False], os.getpid()

    def start(i: int) -> None:
        children[fork_child(i, master, opts, socks, limits, metrics, httpd)] = i

    def forward(sig: int, frame: Any) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping[0] = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM if sig == signal.SIGINT else sig)
            except ProcessLookupError:
                pass
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for i in range(len(socks)):
        start(i)
    if httpd is not None:
        start(-1)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        gone: int | None = children.pop(pid) if pid in children else None
        if gone is not None and gone >= 0:
            limits.clear(gone)              # its sessions died with it
            metrics.retire(gone)            # its counters stay counted
        if gone is not None and not stopping[0]:
            what = "metrics server" if gone == -1 else "worker"
            log(f"{what} {pid} ended ({status}); starting another")
            time.sleep(RESTART_PAUSE)
            start(gone)
    log("stopped")
    return 0


def main(opts: SmtpdOptions) -> None:
    limits = Limits(opts.max_connections, opts.max_per_ip, opts.workers,
                    (opts.harvest_limit, opts.harvest_window))
    metrics = Metrics(opts.workers)

    def serve_metrics() -> Any:
        from ..serving.metrics import bind as bind_metrics
        from ..serving.metrics import server as metrics_server
        return metrics_server(metrics, bind_metrics(opts.metrics))

    def preload() -> None:
        # everything a session needs is loaded while we may still read it: after
        # --user, the Python installation (root's, often) may be out of reach
        import concurrent.futures.thread  # noqa: F401
        import ssl  # noqa: F401

        from . import secure
        opts.tls = secure.tls_context(opts.qmail_dir, os.environ, log)
    opened = open_server(PROG, log, opts.listen or "",
                         lambda: [bind(opts, opts.workers > 1) for _ in range(opts.workers)],
                         opts.metrics, serve_metrics, opts.user, preload)
    socks, httpd = opened.socks, opened.httpd
    if opts.workers == 1:
        if httpd is not None:
            import threading
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
        sys.exit(run_worker(opts, socks[0], limits, metrics))
    sys.exit(supervise_workers(opts, socks, limits, metrics, httpd))
