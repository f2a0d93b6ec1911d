"""The long-running servers' options (validrcptto-smtpd --listen, validrcptto-policyd):
each declared once, as a field of its program's options dataclass (``declare.setting``
with its flag, metavar and environment variable), so a daemontools ``env/`` directory
or a systemd ``EnvironmentFile`` sets any of them; argparse, ``--help`` (naming the
variable) and the README follow from the fields.  A flag wins over the variable, which
wins over the default; an empty variable is the default (an empty ``env/`` file); the
values are read by the one loader every program shares (``declare.load``)."""

from __future__ import annotations

import argparse

from ..declare import _bool, declared, shown_default


def add_params(p: argparse.ArgumentParser, cls: type) -> None:
    """Each field as an option whose help ends with its default and its variable; the
    value is left None unless given (and unparsed: ``declare.load`` parses and checks
    flags and variables alike)."""
    for opt in declared(cls):
        text, default = opt.help, shown_default(opt)
        if default:
            text += f" (default: {default})"
        if opt.env:
            text += f" [${opt.env}]"
        if opt.parse is _bool:
            p.add_argument(opt.flag, dest=opt.name, action="store_const", const="1",
                           default=None, help=text)
        else:
            p.add_argument(opt.flag, dest=opt.name, metavar=opt.metavar, help=text,
                           action="append" if opt.repeat else "store", default=None)
