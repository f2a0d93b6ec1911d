"""What an admin reads: every option in the README's tables is in the matching --help
(with its default), every option a --help lists is in the README, and all three
programs answer --version."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from helpers.tools import script

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
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


def test_validrcptto_smtpd_table_matches_the_help():
    text = helps("validrcptto-smtpd", ())
    documented = first_cells(table("| option | default | meaning |"))
    assert options(text) == documented
    for flag, default in (("--max-connections", "500"), ("--max-per-ip", "20"),
                          ("--grace", "10")):
        assert block(text, flag).endswith(f"(default: {default})"), block(text, flag)


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
