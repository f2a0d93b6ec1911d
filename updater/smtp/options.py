"""validrcptto-smtpd's options: one parameter table (``PARAMS``) that argparse, ``--help``
and the README's table are all made from."""

from __future__ import annotations

import argparse
import os
import ssl

from ..serveropts import Param, add_params, resolve
from .controls import ControlError
from .logline import PROG


PARAMS: list[Param] = [
    ("--listen", "listen", str, None, "HOST:PORT",
     "listen on this address (0.0.0.0:25; [::]:25 for both families); without it, "
     "SMTP on fd 0/1 as under tcpserver (the shipped run script and unit build it from "
     "$IP and $PORT)", None),
    ("--qmail-dir", "qmail_dir", str, "/var/qmail", "DIR",
     "qmail's home: control/ and bin/qmail-queue", "QMAIL_DIR"),
    ("--rules", "rules", str, "", "CDB",
     "tcprules cdb, read as tcpserver -x reads it and re-read when it changes; missing "
     "or not a cdb: every connection is dropped (default: none, all allowed)", "TCPRULES"),
    ("--max-connections", "max_connections", int, 500, "N",
     "sessions in all, across the workers; past it: 421", "CONCURRENCY"),
    ("--max-per-ip", "max_per_ip", int, 20, "N",
     "sessions per client address, 0 for no limit; past it: 421", "MAX_PER_IP"),
    ("--workers", "workers", int, 1, "N", "processes sharing the port (0: one per CPU)",
     "WORKERS"),
    ("--user", "user", str, "", "NAME",
     "run as this account once the port is bound: its uid and gid, no other groups "
     "(default: stay as started, with a warning when that is root)", "SMTPD_USER"),
    ("--grace", "grace", float, 10.0, "SECONDS",
     "after SIGTERM, sessions have this long to finish; then 421 between commands",
     "GRACE"),
    ("--write-timeout", "write_timeout", float, 0.0, "SECONDS",
     "a client that leaves our replies unread this long is dropped "
     "(0: control/timeoutsmtpd, as in qmail)", "WRITE_TIMEOUT"),
    ("--local-name", "local_name", str, "", "NAME",
     "TCPLOCALHOST for sessions (default: control/me)", "LOCALNAME"),
    ("--metrics", "metrics", str, "", "HOST:PORT",
     "serve Prometheus metrics at http://HOST:PORT/metrics (all workers summed)",
     "SMTPD_METRICS"),
    ("--checkpassword", "checkpassword", str, "", "'PROG ARGS'",
     "checkpassword program for AUTH (none: no AUTH)", "CHECKPASSWORD"),
]
QUIET_ENV = "SMTPD_QUIET"


class Options:
    """The parsed options: one attribute per PARAMS row (set from the table)."""
    listen: str | None
    qmail_dir: str
    rules: str
    max_connections: int
    max_per_ip: int
    workers: int
    user: str
    grace: float
    write_timeout: float
    local_name: str
    metrics: str
    checkpassword: str

    def __init__(self) -> None:
        for _, attr, _, default, _, _, _ in PARAMS:
            setattr(self, attr, default)
        self.verbose = True
        self.tls: ssl.SSLContext | None = None


def parser() -> argparse.ArgumentParser:
    from .. import __version__
    p = argparse.ArgumentParser(
        prog=PROG,
        description="qmail-smtpd with the validrcptto.cdb check: on fd 0/1 under "
        "tcpserver (no options needed), or as a long-running server with --listen.  "
        "Per-connection settings come from the environment as in qmail-smtpd "
        "(VALIDRCPTTO_CDB, VALIDRCPTTO_LIMIT, VALIDRCPTTO_LOG, RELAYCLIENT, DATABYTES, "
        "QMAILQUEUE, CHECKPASSWORD, TLS_CERT, ...: see the README).")
    add_params(p, PARAMS)
    p.add_argument("--quiet", dest="verbose", action="store_false", default=None,
                   help=f"no ok/end/deny/busy line per connection (default: one each) "
                   f"[${QUIET_ENV}=1]")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def parse_args(argv: list[str]) -> Options:
    """Options for either front end; argparse's exit 2 on a bad argument."""
    p = parser()
    ns = p.parse_args(argv)
    # under tcpserver (no --listen) a bad server variable must not cost a session
    resolve(ns, PARAMS, os.environ, p.error if ns.listen is not None else lambda _: None)
    if ns.verbose is None:
        ns.verbose = os.environ.get(QUIET_ENV, "").strip().lower() not in ("1", "yes", "true")
    opts = Options()
    for name, value in vars(ns).items():
        if value is not None:
            setattr(opts, name, value)
    for flag, attr, kind, _, _, _, _ in PARAMS:
        if kind in (int, float) and getattr(opts, attr) < 0:
            parser().error(f"{flag} must not be negative")
    if opts.listen is not None:
        try:
            parse_listen(opts.listen)
        except ValueError as err:
            parser().error(f"--listen: {err}")
    if opts.workers == 0:
        opts.workers = os.cpu_count() or 1
    opts.qmail_dir = os.path.abspath(opts.qmail_dir)
    if opts.checkpassword:
        os.environ["CHECKPASSWORD"] = opts.checkpassword
    opts.max_connections = max(1, opts.max_connections)
    if not opts.local_name:
        try:
            from .controls import readline
            me = readline(os.path.join(opts.qmail_dir, "control", "me"))
            opts.local_name = me.decode("utf-8", "surrogateescape") if me else ""
        except ControlError:
            opts.local_name = ""
    return opts


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)
