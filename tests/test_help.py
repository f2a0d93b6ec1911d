"""What an admin reads: every option in the settings tables (docs/settings.md,
docs/smtpd.md, docs/postfix.md) is in the matching --help (with its default), every
option a --help lists is in a table, and all three programs answer --version."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers.tools import script

TOP = Path(__file__).resolve().parent.parent
# what an admin reads: the README and the topic pages it points to, in its order
PAGES = ["README.md", "docs/settings.md", "docs/smtpd.md", "docs/postfix.md", "docs/deploy.md"]
README = "\n".join((TOP / p).read_text() for p in PAGES)
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-z])\b")


def helps(prog: str, *argvs: tuple[str, ...]) -> str:
    out = []
    for argv in argvs:
        done = subprocess.run([script(prog), *argv, "--help"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, (argv, done.stderr)
        out.append(done.stdout)
    return "\n".join(out)


def options(text: str) -> set[str]:
    """The option names a --help lists (its "options:" part)."""
    found = set()
    for line in text.splitlines():
        m = re.match(r"\s{2}(-\w, )?(--?[a-z][\w-]*)", line)
        if m:
            found.add(m.group(2))
    return found - {"-h", "--help", "--version"}


def block(text: str, flag: str) -> str:
    """The help of one option: its line and the indented lines after it, joined."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"\s{{2}}(-\w, )?{re.escape(flag)}\b", line):
            out = [line]
            for more in lines[i + 1:]:
                if not more.startswith(" " * 4) or more.lstrip().startswith("-"):
                    break
                out.append(more)
            return " ".join(x.strip() for x in out)
    raise AssertionError(f"{flag} not in the help")


def table(heading: str) -> list[str]:
    """The rows of the first table after a heading (or a line starting with it)."""
    start = README.index(heading)
    rows = []
    lines = README[start:].splitlines()
    for line in lines if heading.startswith("|") else lines[1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return rows[2:]


def first_cells(rows: list[str]) -> set[str]:
    flags = set()
    for row in rows:
        flags |= set(FLAG.findall(row.split("|")[1]))
    return flags


SUBCOMMANDS = [("generate",), ("build",), ("run",), ("publish",), ("check",), ("demo",),
               ("status",), ("trigger",)]


def test_qmail_updater_settings_tables_match_the_help():
    text = helps("qmail-updater", *SUBCOMMANDS)
    listed = options(text)
    documented = first_cells(table("## Settings")) | first_cells(table("Directory sources"))
    commands = set()
    for row in table("## Commands"):
        if row.split("|")[1].strip().startswith("`qmail-updater"):
            commands |= set(FLAG.findall(row))
    assert documented - listed == set(), "in the README but in no --help"
    assert listed - documented - commands == set(), "in a --help but not in the README"
    # defaults are shown, as the README's table has them
    for flag, default in (("--max-shrink", "20"), ("--quiet", "2"), ("--fifo-mode", "620"),
                          ("--min-interval", "30"), ("--interval", "3600"),
                          ("--uid-min", "500"), ("--qmail-ext", "off")):
        assert block(text, flag).endswith(f"; default {default}]"), block(text, flag)


def env_column(rows: list[str]) -> dict[str, str]:
    """flag -> the variable in the "environment" column."""
    out = {}
    for row in rows:
        cells = row.split("|")
        flag = FLAG.findall(cells[1])[0]
        var = re.search(r"`([A-Z_]+)`", cells[2])
        if var:
            out[flag] = var.group(1)
    return out


def help_vars(text: str) -> dict[str, str]:
    """flag -> the variable its --help names ([$VAR])."""
    out = {}
    for flag in options(text):
        m = re.search(r"\[\$([A-Z_]+)(=1)?\]$", block(text, flag))
        if m:
            out[flag] = m.group(1)
    return out


SERVICE = Path(__file__).resolve().parent.parent / "service"
# in the smtpd env/ but no option's: the run scripts' own, and the per-connection ones
SMTPD_OTHER = {"PATH", "IP", "PORT", "SMTPD_UID", "SMTPD_GID", "VALIDRCPTTO_CDB",
               "VALIDRCPTTO_LIMIT", "VALIDRCPTTO_LOG", "VALIDRCPTTO_REPLY", "VALIDRCPTTO_TARPIT",
               "AUTH_MAX_FAILURES", "AUTH_PLAINTEXT",
               "CHECKPASSWORD_TIMEOUT", "TLS_CERT", "TLS_KEY"}


def test_validrcptto_smtpd_table_matches_the_help():
    text = helps("validrcptto-smtpd", ())
    rows = table("| option | environment | default | meaning |")
    documented = first_cells(rows)
    assert options(text) == documented
    for flag, default in (("--max-connections", "500"), ("--max-per-ip", "20"),
                          ("--grace", "10")):
        assert f"(default: {default}) [$" in block(text, flag), block(text, flag)
    # every option but --listen (IP:PORT) has its variable, named alike in --help, the
    # README and the shipped env/ directory; the README names the other files too
    named = help_vars(text)
    assert named == {k: v for k, v in env_column(rows).items() if k != "--listen"}
    assert set(options(text)) - set(named) == {"--listen"}
    env_dir = set(os.listdir(SERVICE / "validrcptto-smtpd/env"))
    assert set(named.values()) <= env_dir
    assert env_dir - set(named.values()) <= SMTPD_OTHER
    for var in env_dir - {"PATH"}:
        assert f"`{var}`" in README, var


def test_validrcptto_policyd_table_matches_the_help_and_its_env_dir():
    text = helps("validrcptto-policyd", ())
    head = "| option | environment | default | meaning |\n|---|---|---|---|\n"
    rows = table(head + "| `--listen ADDR`")
    assert options(text) == first_cells(rows)
    named = help_vars(text)
    assert named == env_column(rows) and set(named) == options(text)
    assert set(os.listdir(SERVICE / "validrcptto-policyd/env")) - {"PATH"} == \
        set(named.values())


def test_options_come_from_the_environment(tmp_path: Path):
    """A variable sets the option, a flag wins over it, a bad one is a usage error
    naming it (--listen mode); under tcpserver it never costs a session."""
    env = {**os.environ, "GRACE": "abc"}
    done = subprocess.run([script("validrcptto-smtpd"), "--listen", "127.0.0.1:1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "$GRACE: not a number: 'abc'" in done.stderr
    done = subprocess.run([script("validrcptto-policyd")], capture_output=True, text=True,
                          env={**os.environ, "LISTEN": "", "VERBOSE": "x"}, timeout=60)
    assert done.returncode == 2 and "$VERBOSE" in done.stderr
    # the declaration's bounds, checked by the one loader the servers share
    for value, words in (("0", "$CONCURRENCY: must be positive, got 0"),
                         ("-3", "$CONCURRENCY: must not be negative, got '-3'")):
        done = subprocess.run([script("validrcptto-smtpd"), "--listen", "127.0.0.1:1"],
                              env={**os.environ, "CONCURRENCY": value}, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and words in done.stderr, done.stderr
    done = subprocess.run([script("validrcptto-smtpd"), "--listen", "127.0.0.1:1",
                           "--max-connections", "0"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "--max-connections: must be positive, got 0" in done.stderr
    import updater.smtpd.options as o
    from updater.smtpd.options import parse_args
    saved = dict(os.environ)
    try:
        os.environ.update(CONCURRENCY="7", WORKERS="3", SMTPD_QUIET="1", GRACE="2.5")
        opts = parse_args(["--listen", "127.0.0.1:1", "--workers", "2"])
        assert (opts.max_connections, opts.workers, opts.verbose, opts.grace) == \
            (7, 2, False, 2.5)
        os.environ["GRACE"] = "bad"
        assert parse_args(["--qmail-dir", str(tmp_path)]).grace == 10.0   # tcpserver mode
    finally:
        os.environ.clear()
        os.environ.update(saved)
    del o


def test_mkvalidrcptto_help_is_plain_text_and_matches():
    text = helps("mkvalidrcptto", ())
    assert "``" not in text
    row = next(r for r in table("## Commands") if "`mkvalidrcptto" in r)
    assert set(FLAG.findall(row)) <= options(text)
    assert options(text) - set(FLAG.findall(row)) == options(helps("qmail-updater",
                                                                   ("generate",))) - {
        "--origins", "--format"}


def test_every_program_has_version_and_trigger_has_a_real_help():
    for prog in ("qmail-updater", "validrcptto-smtpd", "mkvalidrcptto"):
        done = subprocess.run([script(prog), "--version"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and re.fullmatch(rf"{prog} \d+\.\d+\.\d+\n", done.stdout)
    text = helps("qmail-updater", ("trigger",))
    assert {"--fifo", "--qmail-dir"} <= options(text) and "exit status" in text


def test_one_loader_for_every_program(tmp_path: Path):
    """The daemon's settings and both servers' options go through declare.load: the
    same words for a bad value, a flag over its variable, an empty variable (an empty
    env/ file) as the default, bounds and choices from the declaration."""
    from updater import declare
    from updater.config import load
    from updater.errors import ConfigError
    from updater.postfix.policyd import PolicydOptions
    from updater.smtpd.options import SmtpdOptions
    for cls, var in ((SmtpdOptions, "GRACE"), (PolicydOptions, "IDLE_TIMEOUT")):
        with pytest.raises(ConfigError, match=rf"^\${var}: not a number: 'x'$"):
            declare.load(cls, None, {var: "x"})
    with pytest.raises(ConfigError, match=r"^\$UPDATER_QUIET: not a number: 'x'$"):
        load(environ={"UPDATER_QUIET": "x"})
    with pytest.raises(ConfigError, match=r"^\$UPDATER_QUIET: not a finite number: 'nan'$"):
        load(environ={"UPDATER_QUIET": "nan"})
    with pytest.raises(ConfigError, match=r"^\$UPDATER_LDAP_ADDRESSES: expected proxy-first, "
                       r"proxy or all, got 'x'$"):
        load(environ={"UPDATER_LDAP_ADDRESSES": "x"})
    with pytest.raises(ConfigError, match=r"^\$UPDATER_MYSQL_TIMEOUT: must be positive"):
        load(environ={"UPDATER_MYSQL_TIMEOUT": "0"})
    # empty: the default, whatever the type (a switch too)
    s = load(environ={"UPDATER_LDAP_ADDRESSES": " ", "UPDATER_QUIET": "", "QMAIL_DIR": "",
                      "UPDATER_INCREMENTAL": ""})
    assert (s.ldap_addresses, s.quiet, s.qmail_dir, s.incremental) == \
        ("proxy-first", 2.0, "/var/qmail", True)
    p = declare.load(PolicydOptions, None, {"MAP_NAME": "", "SOCKET_MODE": "",
                                            "LISTEN": "127.0.0.1:1 unix:/x"})
    assert (p.map_name, p.socket_mode, p.listen) == ("validrcptto", "0660",
                                                     ["127.0.0.1:1", "unix:/x"])
    # a bad value handed to ``error`` keeps the default (the tcpserver front end's way)
    seen: list[str] = []
    o = declare.load(SmtpdOptions, None, {"GRACE": "-1", "SMTPD_QUIET": "yes"}, seen.append)
    assert (o.grace, o.verbose, seen) == (10.0, False, ["$GRACE: must not be negative, "
                                                        "got '-1'"])
