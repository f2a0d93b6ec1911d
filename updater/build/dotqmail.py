"""What a ``.qmail`` file runs: its program lines split as a shell would, whether its
first program line always bounces (bouncesaying, or an exit code qmail-local takes as
permanent), and whether it runs vdelivermail or fastforward (and with which cdb).
Pure functions over the file's text."""

from __future__ import annotations

import functools
import os

from .qmail import control_lines


def delivery_commands(text: str | None) -> list[list[str]]:
    """The program lines (``|cmd args``) of a .qmail file, split like a shell would."""
    return [list(_shell_words(line[1:])) for _, line in control_lines(text)
            if line.startswith("|")]


@functools.lru_cache(maxsize=256)
def _shell_words(command: str) -> tuple[str, ...]:
    """Cached: a thousand domains' default files usually hold the same line."""
    import shlex
    try:
        return tuple(shlex.split(command))
    except ValueError:                          # unbalanced quotes: qmail's sh would fail too
        return tuple(command.split())


# qmail-local's permanent exit codes (a program exiting with one bounces the message)
PERMANENT_EXITS = frozenset({64, 65, 70, 76, 77, 78, 100, 112})


def always_bounces(argv: list[str]) -> bool:
    """A program line that bounces every message: ``bouncesaying TEXT`` without a
    program to ask (bouncesaying(1)), or ``exit N`` with a permanent code."""
    if not argv:
        return False
    prog = os.path.basename(argv[0])
    if prog == "bouncesaying":
        return len(argv) <= 2
    if prog == "exit" and len(argv) == 2 and argv[1].isdigit():
        return int(argv[1]) in PERMANENT_EXITS
    return False


def bounces(text: str | None) -> bool:
    """qmail-local bounces every message this .qmail file gets: its first program line
    always bounces.  Forward and mailbox lines before it cannot stop that (qmail-local
    runs the lines in order, and a program's permanent failure bounces the message,
    its forwards unsent); any other program first may decide otherwise."""
    for argv in delivery_commands(text):
        return always_bounces(argv)
    return False


def runs(text: str | None, program: str) -> list[str] | None:
    """The arguments of the first line of a .qmail file that runs ``program``."""
    for argv in delivery_commands(text):
        if argv and os.path.basename(argv[0]) == program:
            return argv[1:]
    return None


def fastforward_cdb(args: list[str]) -> str | None:
    """fastforward [-nNpP] cdb: the first argument that is not an option."""
    for a in args:
        if not a.startswith("-"):
            return a
    return None
