"""The man pages: the committed ones are what the code declares now (regenerate with
``python -m updater.manpage man``), man(1) renders each without a warning, and every
option each program's --help lists and every variable its service env/ directory
holds appear in them.  That they are installed where man finds them is checked by
tests/test_deploy.py on Deploy's virtual environment."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers.tools import need, script

TOP = Path(__file__).resolve().parent.parent
MAN = TOP / "man"


def render(rel: str) -> str:
    """The page as man shows it, hyphenation and adjustment off (so words stay whole)."""
    done = subprocess.run([need("man"), "-l", str(MAN / rel)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "MANWIDTH": "200",
                                                      "MAN_KEEP_FORMATTING": "0"})
    assert done.returncode == 0, done.stderr
    return re.sub(r".\x08", "", done.stdout)


def test_the_committed_pages_are_what_the_code_declares():
    from updater.manpage import PAGES
    assert sorted(str(p.relative_to(MAN)) for p in MAN.rglob("*.[58]")) == sorted(PAGES)
    for rel, make in PAGES.items():
        assert (MAN / rel).read_text() == make(), \
            f"man/{rel} is stale: run python -m updater.manpage man"


@pytest.mark.parametrize("rel", ["man8/qmail-updater.8", "man8/mkvalidrcptto.8",
                                 "man8/validrcptto-smtpd.8", "man8/validrcptto-policyd.8",
                                 "man5/qmail-updater-environ.5"])
def test_groff_renders_each_page_without_a_warning(rel: str):
    # every warning but "cannot adjust/break line" (a long path in a narrow terminal)
    done = subprocess.run([need("groff"), "-z", "-ww", "-Wbreak", "-man", str(MAN / rel)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    text = render(rel)
    assert re.match(r"[A-Z-]+\((5|8)\)", text) and "SEE ALSO" in text


def help_options(prog: str, *argv: str) -> set[str]:
    text = subprocess.run([script(prog), *argv, "--help"], capture_output=True, text=True,
                          timeout=60).stdout
    return set(re.findall(r"^\s{2}(?:-\w, )?(--?[a-z][\w-]*)", text, re.M)) - {"-h", "--help"}


def test_every_option_and_every_exit_status_is_in_the_pages():
    page = render("man8/qmail-updater.8")
    from updater.cli import EXITS
    for command, exits in EXITS.items():
        section = page[page.index(f"\n   {command}\n"):]
        section = section[:section.index("Exit status:") + 2000]
        argv = () if command == "trigger" else (command,)
        for flag in help_options("qmail-updater", *argv) if argv else ():
            assert re.search(rf"^\s+(-\w, )?{re.escape(flag)}\b", section, re.M), (command, flag)
        assert "Exit status: " + exits in " ".join(section.split()), command
    for prog in ("validrcptto-smtpd", "validrcptto-policyd", "mkvalidrcptto"):
        text = render(f"man8/{prog}.8")
        for flag in help_options(prog):
            assert re.search(rf"^\s+(-\w, )?{re.escape(flag)}\b", text, re.M), (prog, flag)


def test_every_variable_is_in_the_environ_page():
    text = render("man5/qmail-updater-environ.5")
    named = set(re.findall(r"^\s{7}([A-Z][A-Z0-9_]+)\b", text, re.M))
    for service in ("qmail-updater", "validrcptto-smtpd", "validrcptto-policyd"):
        shipped = set(os.listdir(TOP / "service" / service / "env")) - {"PATH"}
        assert shipped <= named, (service, shipped - named)
    # and the per-connection ones, as docs/smtpd.md's tables list them
    docs = (TOP / "docs/smtpd.md").read_text()
    listed = set()
    for row in re.findall(r"^\| (`[A-Z][^|]*)\|", docs, re.M):
        listed |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", row))
    from updater.smtp.context import CONNECTION_ENV
    assert listed == {name for name, _ in CONNECTION_ENV}
    assert listed <= named


def test_the_settings_page_has_each_commands_exit_status():
    from updater.cli import EXITS
    docs = (TOP / "docs/settings.md").read_text()
    for command, exits in EXITS.items():
        row = next(r for r in docs.splitlines() if r.startswith(f"| `qmail-updater {command}"))
        assert row.split("|")[3].strip().replace("`", "") == exits, command
