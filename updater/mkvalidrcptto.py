"""mkvalidrcptto, the drop-in for jms1's Perl script: the generate settings and its
own four flags (-n -m -c -d), over the same build as qmail-updater's."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__
from .cli import ENCODING, ERRORS, EXIT_FAIL, EXIT_OK, EXIT_USAGE, EXITS, log, write_list

if TYPE_CHECKING:
    import argparse


def main() -> None:
    sys.exit(mkvalidrcptto(sys.argv[1:]))


MKVALIDRCPTTO_HELP = (
    "Drop-in for jms1's mkvalidrcptto: print every valid address of this qmail server, "
    "one per line (-m: as cdbmake input), or write them as a cdb (-c FILE, atomically, "
    "with the sanity gate).  -d shows where each key comes from on stderr; -n is "
    "accepted and means no per-user -default keys, which is already the default "
    "(UPDATER_QMAIL_EXT=1 adds them).")


def parser() -> argparse.ArgumentParser:
    import argparse

    from . import config
    p = argparse.ArgumentParser(prog="mkvalidrcptto", description=MKVALIDRCPTTO_HELP,
                                epilog="exit status: as qmail-updater generate: "
                                + EXITS["generate"])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-n", action="store_true", help="no per-user -default keys (the default)")
    p.add_argument("-m", action="store_true", help="print cdbmake input instead of keys")
    p.add_argument("-c", metavar="FILE", help="write the list to this cdb (atomically)")
    p.add_argument("-d", action="store_true", help="debug: the origin of every key on stderr")
    config.add_arguments(p, ("generate", "directory"))
    return p


def mkvalidrcptto(argv: Sequence[str]) -> int:
    """Drop-in for jms1's mkvalidrcptto (MKVALIDRCPTTO_HELP)."""
    from . import config
    from .errors import ConfigError, UpdaterError
    p = parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exit_:
        return EXIT_USAGE if exit_.code not in (0, None) else EXIT_OK
    prog = "mkvalidrcptto"
    try:
        settings = config.load(args)
        if args.n:
            settings = settings.__class__(**{**settings.__dict__, "qmail_ext": False})
        from .build.generate import generate
        result = generate(settings)
        for w in result.warnings:
            log(f"warning: {w}", prog)
        if args.d:
            for k in result.sorted_keys():
                log(f"{k.decode(ENCODING, ERRORS)}: {result.origin(k)}", prog)
        if args.c:
            from .install.installer import install_result
            log(install_result(result, args.c, settings).line(), prog)
        else:
            write_list(result, "cdbmake" if args.m else "plain")
        return EXIT_OK
    except ConfigError as err:
        log(str(err), prog)
        return EXIT_USAGE
    except UpdaterError as err:
        log(str(err), prog)
        return EXIT_FAIL
