"""The command line: argparse subcommands, exit codes, and the one place where an error
becomes a line on stderr.

Exit codes: 0 success (installed, unchanged, all accepted), 1 failure (a source error,
a refused or failed install, a rejected address), 2 usage (bad flags or settings, an
unreadable cdb for ``check``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .textsafe import escape

if TYPE_CHECKING:
    import argparse

    from . import config
    from .build.merge import Result

ENCODING, ERRORS = "utf-8", "surrogateescape"

PROG = "qmail-updater"
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def log(message: str, prog: str = PROG) -> None:
    sys.stderr.write(f"{prog}: {escape(message, 2000)}\n")
    sys.stderr.flush()


def out(lines: Sequence[str]) -> None:
    data = "".join(line + "\n" for line in lines).encode(ENCODING, ERRORS)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


# --------------------------------------------------------------------------- commands

def _build_result(settings: config.Settings, partial: bool = False) -> Result:
    from .build.generate import generate
    result = generate(settings, partial=partial)
    for w in result.warnings:
        log(f"warning: {w}")
    return result


def cmd_generate(args: argparse.Namespace, settings: config.Settings) -> int:
    result = _build_result(settings)
    write_list(result, args.format, args.origins)
    return EXIT_OK


def write_list(result: Result, fmt: str = "plain", origins: bool = False) -> None:
    """The list on stdout: plain keys (a rejecting key followed by `` -``), with
    ``origins`` a tab and where each key comes from, or cdbmake's input format."""
    keys = result.sorted_keys()
    rejects = result.rejects
    if fmt == "cdbmake":
        data = b"".join(b"+%d,%d:%s->%s\n" % (len(k), len(v), k, v)
                        for k, v in ((k, result.value(k)) for k in keys)) + b"\n"
    elif origins:
        data = b"".join(k + (b" -" if k in rejects else b"") + b"\t" +
                        result.origin(k).encode(ENCODING, ERRORS) + b"\n" for k in keys)
    elif rejects:
        data = b"".join(k + (b" -\n" if k in rejects else b"\n") for k in keys)
    else:
        data = b"\n".join(keys) + b"\n" if keys else b""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def cmd_build(args: argparse.Namespace, settings: config.Settings) -> int:
    """``build`` and ``accept DOMAIN...`` (the same build, the gate told that an admin
    takes those domains' lists as they are now).  A domain held (its source failed, or
    the gate doubts it) keeps its last good entries: one line each, exit 1."""
    from .build.qmail import ENCODING as ENC
    from .build.qmail import ERRORS as ERR
    from .build.qmail import lower_ascii
    from .install.installer import install_result
    from .install.verdict import Intent
    accept = [lower_ascii(d.strip()) for d in getattr(args, "domain", None) or []]
    result = _build_result(settings, partial=True)
    intent = Intent(accepted=frozenset(d.encode(ENC, ERR) for d in accept))
    report = install_result(result, settings.cdb, settings, settings.force, intent=intent)
    log(report.line())
    for domain, held in sorted(report.held.items()):
        log(held.line(domain))
    if args.diff:
        out(report.diff_lines())
    code = EXIT_FAIL if report.held else EXIT_OK
    for domain in accept:
        if domain in report.held:
            log(f"{domain}: not accepted: its source fails; mend it and it clears by itself")
        elif domain.encode(ENC, ERR) not in result.domains:
            log(f"{domain}: not a domain this server lists (not in rcpthosts)")
            code = EXIT_FAIL
        else:
            log(f"accepted {domain}: its list now is the one it is judged against")
    if settings.publish and report.status == "installed":
        from .publish import publish_once
        return publish_once(settings, settings.cdb, log) or code
    return code


def cmd_publish(args: argparse.Namespace, settings: config.Settings) -> int:
    from .publish import publish_once
    return publish_once(settings, settings.cdb, log)


def cmd_check(args: argparse.Namespace, settings: config.Settings) -> int:
    from .checker import check, open_cdb
    path = settings.cdb
    try:
        getter = open_cdb(path)
    except OSError as err:
        log(f"{path}: cannot open: {err.strerror}")
        return EXIT_USAGE
    status = EXIT_OK
    lines = []
    def shown(key: bytes) -> str:                # the empty key (<>) as ''
        return key.decode(ENCODING, ERRORS) if key else "''"
    for address in args.address:
        raw = address.encode(ENCODING, ERRORS)
        verdict = check(getter, raw)
        key = shown(verdict.key) if verdict.key is not None else "-"
        word = "accept" if verdict.accepted else "reject"
        line = f"{word} {address or '<>'} {key}"
        if args.verbose:
            line += " tried " + " ".join(shown(k) for k in verdict.tried)
        lines.append(line)
        if not verdict.accepted:
            status = EXIT_FAIL
    getter.close()
    out(lines)
    return status


def cmd_dump(args: argparse.Namespace, settings: config.Settings) -> int:
    """What lookups in the cdb find, in cdbdump's format (or, ``--keys``, as generate
    prints them): records an incremental install left behind are not shown."""
    from .checker import REJECT
    from .install.stablecdb import NotCdb, read_items
    path = settings.cdb
    write = sys.stdout.buffer.write
    try:
        if args.keys:
            for k, v in read_items(path):
                write(k + (b" -\n" if v[:1] == REJECT else b"\n"))
        else:
            for k, v in read_items(path):
                write(b"+%d,%d:%s->%s\n" % (len(k), len(v), k, v))
            write(b"\n")
    except OSError as err:
        log(f"{path}: cannot read: {err.strerror or err}")
        return EXIT_USAGE
    except NotCdb as err:
        log(f"{path}: not a cdb: {err}")
        return EXIT_USAGE
    sys.stdout.buffer.flush()
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, settings: config.Settings) -> int:
    from .demo import run_demo
    return run_demo(args.dir, out, log, keep=args.keep)


# --------------------------------------------------------------------------- parser

def parser() -> argparse.ArgumentParser:
    import argparse

    from . import config
    p = argparse.ArgumentParser(prog=PROG, description="Keep qmail's validrcptto.cdb current "
                                "and check recipients against it.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    g = sub.add_parser("generate", help="print every valid address, one per line")
    config.add_arguments(g, ("generate", "directory"))
    g.add_argument("--origins", action="store_true",
                   help="print where each key comes from, after a tab")
    g.add_argument("--format", choices=("plain", "cdbmake"), default="plain",
                   help="plain keys (a rejecting key is followed by ' -'), or cdbmake input")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("build", help="generate and install validrcptto.cdb (and publish it)")
    config.add_arguments(b, ("generate", "directory", "install", "publish"))
    b.add_argument("--force", action="store_true", help="install even if the sanity gate refuses")
    b.add_argument("--diff", action="store_true", help="print added (+), removed (-) and "
                   "changed (~) keys")
    b.set_defaults(func=cmd_build)

    a = sub.add_parser("accept", help="install the list with these held domains' losses "
                       "accepted as they are now")
    config.add_arguments(a, ("generate", "directory", "install", "publish"))
    a.add_argument("--diff", action="store_true", help="print added (+), removed (-) and "
                   "changed (~) keys")
    a.add_argument("domain", nargs="+", help="a domain the gate holds (see status)")
    a.set_defaults(func=cmd_build)

    add_lookup_commands(sub)
    add_service_commands(sub)
    for name, command in sub.choices.items():      # --help and the man page end with it
        command.epilog = "exit status: " + EXITS[name]
    return p


# each command's exit statuses (its --help, qmail-updater(8), docs/settings.md)
EXITS = {
    "generate": "0 ok, 1 source error (nothing printed on stdout), 2 usage",
    "build": "0 installed or unchanged (and published), 1 a domain held, refused or failed "
             "(live cdb untouched) or a push failed, 2 usage",
    "accept": "as build: 0 installed or unchanged, 1 a domain still held, refused or failed "
              "or a push failed, 2 usage",
    "check": "0 all accepted, 1 any rejected, 2 usage or unopenable cdb",
    "dump": "0, 2 usage or a file that cannot be read as a cdb",
    "demo": "0",
    "run": "0 after SIGTERM/SIGINT",
    "publish": "0 all pushed, 1 any failed, 2 usage",
    "trigger": "0 written, 3 no daemon reading, 4 no FIFO, 5 permission denied, 6 not a FIFO "
               "or another error",
    "report": "0, 1 unreadable file, 2 usage",
    "install-hook": "0, 1 it could not (one line), 2 usage",
    "status": "0, or 1 if the last build failed or anything makes it untrue (a line on "
              "stderr each)",
}


def add_lookup_commands(sub: Any) -> None:
    """The commands that read a cdb or show the sample: check, dump, demo."""
    from . import config
    c = sub.add_parser("check", help="look addresses up as qmail-smtpd would")
    config.add_arguments(c, (), names=("qmail_dir", "cdb"))
    c.add_argument("-v", "--verbose", action="store_true", help="also print every key tried")
    c.add_argument("address", nargs="+", help="recipient addresses (use '' for <>)")
    c.set_defaults(func=cmd_check)

    du = sub.add_parser("dump", help="print what lookups in the cdb find, as cdbmake input")
    config.add_arguments(du, (), names=("qmail_dir", "cdb"))
    du.add_argument("--keys", action="store_true",
                    help="one key a line, as generate prints them (a rejecting key "
                    "followed by ' -')")
    du.set_defaults(func=cmd_dump)

    d = sub.add_parser("demo", help="build the bundled sample tree and show the result")
    d.add_argument("--dir", help="build the sample here (kept) instead of in a temporary "
                   "directory that is removed at the end")
    d.add_argument("--keep", action="store_true",
                   help="keep the temporary directory and print where it is")
    d.set_defaults(func=cmd_demo)


def add_service_commands(sub: Any) -> None:
    """The commands of a running installation: the daemon, publish, trigger, report,
    status."""
    from . import config
    r = sub.add_parser("run", help="the rebuild daemon (foreground, for supervise)")
    config.add_arguments(r, ("generate", "directory", "install", "daemon", "publish"))
    r.set_defaults(func=cmd_run)

    pb = sub.add_parser("publish", help="push the live cdb to the other MX hosts now")
    config.add_arguments(pb, ("publish",), names=("cdb",))
    pb.set_defaults(func=cmd_publish)

    t = sub.add_parser("trigger", help="ask the daemon for a build (never blocks)")
    config.add_arguments(t, (), names=("qmail_dir", "fifo"))
    t.add_argument("reason", nargs="*", help="logged by the daemon as the reason")
    t.set_defaults(func=None)

    rp = sub.add_parser("report", help="what validrcptto-smtpd refused, from its multilog files")
    rp.add_argument("--since", default="24h",
                    help="only lines this recent: 90m, 24h, 7d (default: 24h)")
    rp.add_argument("--top", type=int, default=10,
                    help="how many domains to list (default: 10)")
    rp.add_argument("logfile", nargs="+", help="multilog files (current, @*.s)")
    rp.set_defaults(func=cmd_report)

    h = sub.add_parser("install-hook", help="install vpopmail's onchange hook (as root, "
                       "never through a planted link)")
    h.add_argument("--fifo", required=True, help="the daemon's trigger FIFO")
    h.add_argument("template", help="the shipped hook (service/onchange)")
    h.add_argument("path", help="where it goes (~vpopmail/etc/onchange)")
    h.set_defaults(func=cmd_install_hook)

    st = sub.add_parser("status", help="what the daemon's last build did")
    config.add_arguments(st, (), names=("qmail_dir", "status"))
    st.add_argument("--service", help="the daemon's service directory (its env/ is read); "
                    "default: a running daemon's own environment, else "
                    "$SERVICE/qmail-updater, /etc/service/qmail-updater, ...")
    st.add_argument("--json", action="store_true", help="print the status file as it is")
    st.set_defaults(func=cmd_status)


def cmd_report(args: argparse.Namespace, settings: config.Settings) -> int:
    from .report import Report, log_lines, read, since
    try:
        start = since(args.since)
    except ValueError as err:
        log(f"--since: {err}")
        return EXIT_USAGE
    report = Report()
    for path in args.logfile:
        try:
            read(log_lines(path, report), start, report)
        except OSError as err:
            log(f"{path}: cannot read: {err.strerror or err}")
            return EXIT_FAIL
    out(report.lines(args.top))
    return EXIT_OK


def cmd_install_hook(args: argparse.Namespace, settings: config.Settings) -> int:
    from .hook import install_hook
    out([("installed " if install_hook(args.template, args.fifo, args.path) else "unchanged ")
         + args.path])
    return EXIT_OK


def cmd_run(args: argparse.Namespace, settings: config.Settings) -> int:
    from .daemon.driver import Daemon
    return Daemon(settings, log).run()


def cmd_status(args: argparse.Namespace, settings: config.Settings) -> int:
    """What the daemon's last build did, and everything that makes it untrue (exit 1)."""
    import json

    from .daemon.status import checks, describe, read_status, status_settings
    settings, where = status_settings(args, settings)
    st = read_status(settings.status)
    running, problems, notes = checks(settings, st, where)
    if st is None:
        log(f"{settings.status}: no status yet (" + (
            f"qmail-updater run is running: {running})" if running else
            "is qmail-updater run running?)"))
    else:
        st["running"] = running
        out([json.dumps(st, indent=1, sort_keys=True)] if args.json else describe(st))
    for line in problems + notes:
        log(line)
    return EXIT_FAIL if st is None or st.get("result") == "failed" or problems else EXIT_OK


def run(argv: Sequence[str] | None, prog: str = PROG) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["trigger"]:
        from .trigger import trigger
        return trigger(argv[1:], log)
    from . import config
    from .errors import ConfigError, UpdaterError
    try:
        args = parser().parse_args(argv)
    except SystemExit as exit_:
        return EXIT_USAGE if exit_.code not in (0, None) else EXIT_OK
    try:
        settings = config.load(args)
        code: int = args.func(args, settings)
        return code
    except ConfigError as err:
        log(str(err), prog)
        return EXIT_USAGE
    except UpdaterError as err:
        log(str(err), prog)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


def main() -> None:
    sys.exit(run(sys.argv[1:]))
