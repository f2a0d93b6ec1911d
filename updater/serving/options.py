"""The long-running servers' options (validrcptto-smtpd --listen, validrcptto-policyd):
each declared once, as a field of its program's options dataclass (``declare.setting``
with its flag, metavar and environment variable), so a daemontools ``env/`` directory
or a systemd ``EnvironmentFile`` sets any of them; argparse, ``--help`` (naming the
variable) and the README follow from the fields.  A flag wins over the variable, which
wins over the default; an empty variable is the default (an empty ``env/`` file)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ..declare import Opt, declared

T = TypeVar("T")


def kind(opt: Opt) -> type:
    """The type argparse converts a flag's value to (the default's; str for None)."""
    return type(opt.default) if opt.default is not None else str


def add_params(p: argparse.ArgumentParser, cls: type) -> None:
    """Each field as an option whose help ends with its default and its variable; the
    value is left None unless given, so ``build`` can fill it."""
    for opt in declared(cls):
        text = opt.help
        if opt.default not in (None, ""):
            text += f" (default: {opt.default:g})" if isinstance(opt.default, float) \
                else f" (default: {opt.default})"
        if opt.env:
            text += f" [${opt.env}]"
        p.add_argument(opt.flag, dest=opt.name, type=kind(opt), metavar=opt.metavar,
                       help=text, action="append" if opt.repeat else "store", default=None)


def build(cls: type[T], ns: argparse.Namespace, environ: Mapping[str, str],
          error: Callable[[str], object]) -> T:
    """The options: flags, else the environment, else the defaults; a variable that does
    not parse, a negative number (zero too where the declaration says ``positive``) or
    a value outside its choices is a usage error naming it (``error``; when it returns,
    the default is kept): the same declaration the daemon's settings loader honours."""
    values: dict[str, Any] = {}
    for opt in declared(cls):
        value = getattr(ns, opt.name, None)
        raw = environ.get(opt.env, "").strip() if opt.env and value is None else ""
        if raw:
            try:
                value = raw.split() if opt.repeat else kind(opt)(raw)
            except ValueError:
                error(f"${opt.env}: not a valid {opt.flag} value: {raw!r}")
                value = None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                value < 0 or opt.positive and value == 0):
            error(f"{opt.flag} must {'be positive' if opt.positive else 'not be negative'}")
            value = None
        if value is not None and opt.choices and value not in opt.choices:
            error(f"{opt.flag} (or ${opt.env}): expected {' or '.join(opt.choices)}, "
                  f"got {value!r}")
            value = None
        if value is not None:
            values[opt.name] = value
    return cls(**values)
