"""``qmail-updater demo``: build the bundled sample tree and show what came out."""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Sequence

from . import config
from .checker import check, open_cdb
from .errors import UpdaterError
from .generate import generate
from .install import install
from .qmail import ENCODING, ERRORS
from .sample import ADDRESSES, make_tree


def run_demo(directory: str | None, out: Callable[[Sequence[str]], None],
             log: Callable[[str], None]) -> int:
    if directory:
        os.makedirs(directory, exist_ok=True)
        return _demo(os.path.abspath(directory), out, log)
    with tempfile.TemporaryDirectory(prefix="qmail-updater-demo.") as tmp:
        return _demo(tmp, out, log)


def _demo(root: str, out: Callable[[Sequence[str]], None], log: Callable[[str], None]) -> int:
    env = make_tree(root)
    settings = config.load(None, env)
    out([f"sample qmail tree in {root}", ""])
    try:
        result = generate(settings)
        report = install(result.items(), settings.cdb, max_shrink=settings.max_shrink)
    except UpdaterError as err:
        log(str(err))
        return 1
    for w in result.warnings:
        out([f"warning: {w}"])
    out(["", f"{report.line()}", "", "entries (key, value, origin):"])
    out([f"  {k:<40} {v or ' '}  {result.origin(k).replace(root, '.')}"
         for k, v in result.items()])
    out(["", "what qmail-smtpd would answer (qmail-updater check):"])
    getter = open_cdb(settings.cdb)
    try:
        for address in ADDRESSES:
            v = check(getter, address.encode(ENCODING, ERRORS))
            key = v.key.decode(ENCODING, ERRORS) if v.key is not None else "(none)"
            out([f"  {'250 accept' if v.accepted else '553 reject'}  {address:<36} "
                 f"decided by {key}"])
    finally:
        getter.close()
    return 0
