"""The man pages, made from the programs' own parsers and declarations: each option's
line is the --help line argparse would print, each variable's the field that declares
it (``declare.declared``), each command's exit status the text its --help ends with.
Nothing here repeats a setting; ``python -m updater.manpage DIR`` writes
DIR/man8/*.8 and DIR/man5/*.5, and tests/test_manpages.py holds the committed pages
to this output and renders them with man(1).  Pure but for ``main``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from . import __version__

TITLE = "qmail-updater"

# what the generator reads, for FILES (under QMAIL_DIR unless absolute)
READS = (
    ("control/rcpthosts, control/morercpthosts.cdb", "the domains this host takes mail for"),
    ("control/locals, control/me", "local domains (qmail-send's rule)"),
    ("control/virtualdomains", "virtual domains and their prepends"),
    ("control/smtproutes", "routed domains, listed as @domain"),
    ("users/cdb, users/assign", "qmail-lspawn's assignments (qmail-newu's output)"),
    ("alias/.qmail-*, ~user/.qmail-*", "qmail-local's dot-qmail files"),
    ("/etc/aliases.cdb", "fastforward's aliases, when a .qmail-default runs fastforward"),
    ("~vpopmail/domains/*/vpasswd, .qmail-*", "vpopmail's users, aliases and catch-alls"),
    ("~vpopmail/etc/vpopmail.mysql", "vpopmail's MySQL connection (UPDATER_MYSQL)"),
    ("control/validrcptto.include, control/validrcptto.exclude", "the site's own additions"),
    ("control/validrcptto.ldapdomains", "the domains listed from LDAP"),
)
WRITES = (
    ("control/validrcptto.cdb", "the list (VALIDRCPTTO_CDB), replaced by rename"),
    ("control/validrcptto.cdb.sources", "the live list's record: sources, peaks, held domains"),
    ("control/validrcptto.cdb.lock, .daemon", "the build lock and the daemon's lock"),
    ("control/validrcptto.trigger", "the trigger FIFO the onchange hook writes"),
    ("control/validrcptto.status", "the daemon's status file (JSON)"),
)


# read by the shipped run scripts only (service/validrcptto-smtpd/run, run.tcpserver)
RUN_SCRIPT_ENV = (
    ("IP", "run: the address --listen binds (default 0.0.0.0)"),
    ("PORT", "run: its port (default 25)"),
    ("SMTPD_UID", "run.tcpserver: tcpserver -u (the uid the sessions run as)"),
    ("SMTPD_GID", "run.tcpserver: tcpserver -g"),
)


def esc(text: str) -> str:
    """Text as roff reads it: backslashes and hyphens escaped, no line taken for a
    request."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + x if x.startswith((".", "'")) else x for x in out.split("\n"))


def para(text: str) -> str:
    return ".PP\n" + esc(text) + "\n"


def item(term: str, text: str) -> str:
    return f".TP\n.B {esc(term)}\n{esc(text)}\n"


def _expand(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if action.help else ""


def options(parser: argparse.ArgumentParser) -> str:
    """Every option and argument of a parser, as argparse's --help gives them."""
    out = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(
                action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        if action.option_strings:
            names = ", ".join(action.option_strings)
            if action.nargs != 0:
                names += " " + str(action.metavar or action.dest.upper())
        else:
            names = str(action.metavar or action.dest).upper()
        out.append(item(names, _expand(parser, action)))
    return "".join(out)


def header(name: str, section: int, summary: str) -> str:
    return (f'.TH {name.upper()} {section} "" "{TITLE} {__version__}" '
            f'"{"System Manager" if section == 8 else "File Formats"}\'s Manual"\n'
            f".SH NAME\n{esc(name)} \\- {esc(summary)}\n")


def see_also(*pages: str) -> str:
    return ".SH SEE ALSO\n" + ",\n".join(f".BR {p.split('(')[0]} ({p.split('(')[1]}"
                                         for p in pages) + "\n"


def files(rows: Iterable[tuple[str, str]]) -> str:
    return "".join(item(path, what) for path, what in rows)


def exit_status(parser: argparse.ArgumentParser) -> str:
    epilog = parser.epilog or ""
    assert epilog.startswith("exit status: "), parser.prog
    return epilog.removeprefix("exit status: ")


def qmail_updater() -> str:
    from .cli import parser
    p = parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help or "" for c in sub._choices_actions}
    out = [header("qmail-updater", 8, "keep qmail's validrcptto.cdb current"),
           ".SH SYNOPSIS\n.B qmail-updater\n.I command\n[\\fIoptions\\fR]\n",
           ".SH DESCRIPTION\n", esc(p.description or "") + "\n",
           para("Every setting is a flag and an environment variable (a daemontools env/ "
                "directory sets them); a flag wins over the environment, which wins over the "
                "default. The variables are in qmail-updater-environ(5)."),
           ".SH COMMANDS\n"]
    for name, sp in sub.choices.items():
        out.append(f".SS {esc(name)}\n{esc(helps[name])}.\n")
        out.append(options(sp))
        out.append(f".PP\nExit status: {esc(exit_status(sp))}.\n")
    out.append(".SH FILES\nRead (under QMAIL_DIR unless absolute):\n" + files(READS))
    out.append(".PP\nWritten:\n" + files(WRITES))
    out.append(see_also("mkvalidrcptto(8)", "validrcptto-smtpd(8)", "validrcptto-policyd(8)",
                        "qmail-updater-environ(5)", "qmail-send(8)", "qmail-getpw(8)",
                        "qmail-local(8)"))
    return "".join(out)


def single(name: str, parser: argparse.ArgumentParser, summary: str, more: str,
           also: tuple[str, ...]) -> str:
    return "".join([header(name, 8, summary),
                    f".SH SYNOPSIS\n.B {esc(name)}\n[\\fIoptions\\fR]\n",
                    ".SH DESCRIPTION\n", esc(parser.description or "") + "\n",
                    para(more) if more else "", ".SH OPTIONS\n", options(parser),
                    f".SH EXIT STATUS\n{esc(exit_status(parser))}.\n", see_also(*also)])


def mkvalidrcptto() -> str:
    from .mkvalidrcptto import parser
    return single("mkvalidrcptto", parser(), "list qmail's valid recipients",
                  "", ("qmail-updater(8)", "qmail-updater-environ(5)"))


def smtpd() -> str:
    from .smtpd.options import parser
    return single("validrcptto-smtpd", parser(), "qmail-smtpd with the validrcptto.cdb check",
                  "With no option at all it is the tcpserver front end. Each option's "
                  "variable, and the per-connection ones, are in qmail-updater-environ(5).",
                  ("qmail-smtpd(8)", "tcpserver(1)", "validrcptto-policyd(8)",
                   "qmail-updater(8)", "qmail-updater-environ(5)"))


def policyd() -> str:
    from .postfix.policyd import parser
    return single("validrcptto-policyd", parser(), "validrcptto.cdb for Postfix",
                  "", ("postconf(5)", "validrcptto-smtpd(8)", "qmail-updater(8)",
                       "qmail-updater-environ(5)"))


def _declared(title: str, prog: str, cls: type) -> str:
    from .declare import declared, shown_default
    out = [f".SS {esc(title)}\n"]
    for opt in declared(cls):
        if not opt.env:
            continue
        flag = opt.flag or opt.cli
        default = shown_default(opt)
        tail = f" ({prog} {flag}" + (f"; default {default})" if default else ")")
        out.append(item(opt.env, opt.help + tail))
    return "".join(out)


def environ() -> str:
    from .config import Settings
    from .postfix.policyd import PolicydOptions
    from .smtp.context import CONNECTION_ENV
    from .smtpd.options import SmtpdOptions
    return "".join([
        header("qmail-updater-environ", 5, "the variables qmail-updater's programs read"),
        ".SH DESCRIPTION\n",
        esc("Every setting of qmail-updater, validrcptto-smtpd and validrcptto-policyd is "
            "an environment variable, as a daemontools envdir sets it (one file a "
            "variable; an empty file means the default) or systemd's EnvironmentFile; "
            "the flag named after each one wins over it. Booleans take 1/0, yes/no, "
            "true/false.") + "\n",
        ".SH ENVIRONMENT\n",
        _declared("qmail-updater (and mkvalidrcptto)", "qmail-updater", Settings),
        item("UPDATER_USER", "service/qmail-updater/run only: run the daemon as this user "
             "(setuidgid)"),
        _declared("validrcptto-smtpd", "validrcptto-smtpd", SmtpdOptions),
        ".SS " + esc("validrcptto-smtpd, per connection (tcpserver's rules set them)") + "\n",
        "".join(item(name, what) for name, what in CONNECTION_ENV),
        ".SS " + esc("validrcptto-smtpd's run scripts") + "\n",
        "".join(item(name, what) for name, what in RUN_SCRIPT_ENV),
        _declared("validrcptto-policyd", "validrcptto-policyd", PolicydOptions),
        ".SH FILES\n", files(READS + WRITES),
        see_also("qmail-updater(8)", "validrcptto-smtpd(8)", "validrcptto-policyd(8)",
                 "envdir(8)", "tcp-environ(5)"),
    ])


PAGES = {"man8/qmail-updater.8": qmail_updater, "man8/mkvalidrcptto.8": mkvalidrcptto,
         "man8/validrcptto-smtpd.8": smtpd, "man8/validrcptto-policyd.8": policyd,
         "man5/qmail-updater-environ.5": environ}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m updater.manpage DIR", file=sys.stderr)
        return 2
    for rel, render in PAGES.items():
        path = Path(args[0]) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
