"""validrcptto-smtpd's options: one dataclass (``SmtpdOptions``) whose fields declare every
option once; argparse, ``--help`` and the README's table are made from (or tested
against) it."""

from __future__ import annotations

import argparse
import os
import ssl
from dataclasses import dataclass

from .. import declare
from ..declare import qmail_home, setting
from ..serving.controlfiles import ControlError
from ..serving.listeners import parse_listen
from ..serving.options import add_params
from .prog import PROG


@dataclass
class SmtpdOptions:
    """validrcptto-smtpd's options, each declared once (``declare.setting``)."""
    listen: str | None = setting(
        None, flag="--listen", metavar="HOST:PORT", env="",
        help="listen on this address (0.0.0.0:25; [::]:25 for both families); without it, "
        "SMTP on fd 0/1 as under tcpserver (the shipped run script and unit build it from "
        "$IP and $PORT)")
    qmail_dir: str = qmail_home("qmail's home: control/ and bin/qmail-queue")
    rules: str = setting(
        "", flag="--rules", metavar="CDB", env="TCPRULES",
        help="tcprules cdb, read as tcpserver -x reads it and re-read when it changes; missing "
        "or not a cdb: every connection is dropped (default: none, all allowed)")
    max_connections: int = setting(
        500, flag="--max-connections", metavar="N", env="CONCURRENCY", positive=True,
        help="sessions in all, across the workers; past it: 421")
    max_per_ip: int = setting(
        20, flag="--max-per-ip", metavar="N", env="MAX_PER_IP",
        help="sessions per client address, 0 for no limit; past it: 421")
    harvest_limit: int = setting(
        0, flag="--harvest-limit", metavar="N", env="HARVEST_LIMIT",
        help="recipients refused by validrcptto.cdb to one client address, across sessions "
        "and workers, past which its new sessions get 421 at the greeting until "
        "--harvest-window has passed since its first refusal (0: off; RELAYCLIENT "
        "clients are never held back)")
    harvest_window: float = setting(
        600.0, flag="--harvest-window", metavar="SECONDS", env="HARVEST_WINDOW",
        help="the window of --harvest-limit")
    workers: int = setting(
        1, flag="--workers", metavar="N", env="WORKERS",
        help="processes sharing the port (0: one per CPU)")
    user: str = setting(
        "", flag="--user", metavar="NAME", env="SMTPD_USER",
        help="run as this account once the port is bound: its uid and gid, no other groups "
        "(default: stay as started, with a warning when that is root)")
    grace: float = setting(
        10.0, flag="--grace", metavar="SECONDS", env="GRACE",
        help="after SIGTERM, sessions have this long to finish; then 421 between commands")
    write_timeout: float = setting(
        0.0, flag="--write-timeout", metavar="SECONDS", env="WRITE_TIMEOUT",
        help="a client that leaves our replies unread this long is dropped "
        "(0: control/timeoutsmtpd, as in qmail)")
    local_name: str = setting(
        "", flag="--local-name", metavar="NAME", env="LOCALNAME",
        help="TCPLOCALHOST for sessions (default: control/me)")
    metrics: str = setting(
        "", flag="--metrics", metavar="HOST:PORT", env="SMTPD_METRICS",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (all workers summed)")
    checkpassword: str = setting(
        "", flag="--checkpassword", metavar="'PROG ARGS'", env="CHECKPASSWORD",
        help="checkpassword program for AUTH (none: no AUTH)")
    quiet: bool = setting(
        False, flag="--quiet", env="SMTPD_QUIET",
        help="no ok/end/deny/busy line per connection (off: one of each)")
    tls: ssl.SSLContext | None = None

    @property
    def verbose(self) -> bool:
        return not self.quiet


def parser() -> argparse.ArgumentParser:
    from .. import __version__
    p = argparse.ArgumentParser(
        prog=PROG,
        description="qmail-smtpd with the validrcptto.cdb check: on fd 0/1 under "
        "tcpserver (no options needed), or as a long-running server with --listen.  "
        "Per-connection settings come from the environment as in qmail-smtpd "
        "(VALIDRCPTTO_CDB, VALIDRCPTTO_LIMIT, VALIDRCPTTO_LOG, RELAYCLIENT, DATABYTES, "
        "QMAILQUEUE, CHECKPASSWORD, TLS_CERT, ...: see qmail-updater-environ(5)).",
        epilog="exit status: as qmail-smtpd: 0 after QUIT, 1 otherwise; --listen: 0 after "
        "SIGTERM, 111 if it cannot listen or become --user, 2 usage")
    add_params(p, SmtpdOptions)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def parse_args(argv: list[str]) -> SmtpdOptions:
    """SmtpdOptions for either front end; argparse's exit 2 on a bad argument."""
    p = parser()
    ns = p.parse_args(argv)
    # under tcpserver (no --listen) a bad server variable must not cost a session
    opts = declare.load(SmtpdOptions, ns, os.environ,
                        p.error if ns.listen is not None else lambda _: None)
    if opts.listen is not None:
        try:
            parse_listen(opts.listen, unix=False)
        except ValueError as err:
            parser().error(f"--listen: {err}")
    if opts.workers == 0:
        opts.workers = os.cpu_count() or 1
    opts.qmail_dir = os.path.abspath(opts.qmail_dir)
    if not opts.local_name:
        try:
            from ..serving.controlfiles import readline
            me = readline(os.path.join(opts.qmail_dir, "control", "me"))
            opts.local_name = me.decode("utf-8", "surrogateescape") if me else ""
        except ControlError:
            opts.local_name = ""
    return opts
