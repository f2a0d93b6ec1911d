"""The long-running servers' options (validrcptto-smtpd --listen, validrcptto-policyd):
each declared once, as a row of its program's table, with the environment variable that
sets it, so a daemontools ``env/`` directory or a systemd ``EnvironmentFile`` sets any
of them; argparse, ``--help`` (naming the variable) and the README follow from the
table.  A flag wins over the variable, which wins over the default; an empty variable
is the default (an empty ``env/`` file)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping

# flag, attribute, type, default, metavar, help, environment variable (None: none)
Param = tuple[str, str, type, object, str, str, "str | None"]


def add_params(p: argparse.ArgumentParser, params: list[Param],
               repeat: frozenset[str] = frozenset()) -> None:
    """Each row as an option whose help ends with its default and its variable; the
    value is left None unless given, so ``from_env`` and the defaults can fill it."""
    for flag, attr, kind, default, metavar, text, env in params:
        if default not in (None, ""):
            text += f" (default: {default:g})" if kind is float else f" (default: {default})"
        if env:
            text += f" [${env}]"
        p.add_argument(flag, dest=attr, type=kind, metavar=metavar, help=text,
                       action="append" if attr in repeat else "store", default=None)


def resolve(ns: argparse.Namespace, params: list[Param], environ: Mapping[str, str],
            error: Callable[[str], object], repeat: frozenset[str] = frozenset()) -> None:
    """Fill what no flag gave from the environment, then from the defaults; a variable
    that does not parse is a usage error naming it."""
    for flag, attr, kind, default, _, _, env in params:
        if getattr(ns, attr) is not None:
            continue
        raw = environ.get(env or "", "").strip() if env else ""
        if raw:
            try:
                value: object = raw.split() if attr in repeat else kind(raw)
            except ValueError:
                error(f"${env}: not a valid {flag} value: {raw!r}")
                return
            setattr(ns, attr, value)
        else:
            setattr(ns, attr, default)


def env_names(params: list[Param]) -> set[str]:
    return {env for *_, env in params if env}
