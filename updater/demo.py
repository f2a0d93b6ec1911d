"""``qmail-updater demo``: build the bundled sample tree and show what came out."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence

from . import config
from .build.generate import generate
from .build.qmail import ENCODING, ERRORS
from .checker import check, open_cdb
from .errors import UpdaterError
from .install.installer import install_result
from .sample import ADDRESSES, make_tree


def run_demo(directory: str | None, out: Callable[[Sequence[str]], None],
             log: Callable[[str], None], keep: bool = False) -> int:
    if directory:
        os.makedirs(directory, exist_ok=True)
        return _demo(os.path.abspath(directory), out, log)
    if keep:
        tmp = tempfile.mkdtemp(prefix="qmail-updater-demo.")
        code = _demo(tmp, out, log)
        out(["", f"the sample tree is kept in {tmp}"])
        return code
    with tempfile.TemporaryDirectory(prefix="qmail-updater-demo.") as tmp:
        code = _demo(tmp, out, log)
        out(["", f"removing the sample tree {tmp} (--keep or --dir DIR keeps it)"])
    return code


def _demo(root: str, out: Callable[[Sequence[str]], None], log: Callable[[str], None]) -> int:
    env = make_tree(root)
    settings = config.load(None, env)
    out([f"sample qmail tree in {root}", ""])
    try:
        result = generate(settings)
        report = install_result(result, settings.cdb, settings)
    except UpdaterError as err:
        log(str(err))
        return 1
    for w in result.warnings:
        out([f"warning: {w}"])
    out(["", f"{report.line()}", "", "entries (key, value, origin):"])
    out([f"  {k.decode(ENCODING, ERRORS):<40} {v.decode() or ' '}  "
         f"{result.origin(k).replace(root, '.')}" for k, v in result.items()])
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
    out(["", "an SMTP conversation with validrcptto-smtpd (C: client, S: server):"])
    out(smtp_conversation(settings))
    return 0


def smtp_conversation(settings: config.Settings) -> list[str]:
    """Run validrcptto-smtpd on the sample as tcpserver would and show the dialogue."""
    import subprocess
    import sys
    client = [b"EHLO client.example", b"MAIL FROM:<someone@example.org>",
              b"RCPT TO:<Mary@vpop.example.net>", b"RCPT TO:<nobody@vpop.example.net>",
              b"RCPT TO:<spamtrap@catchall.example.org>", b"QUIT"]
    env = dict(os.environ, QMAIL_DIR=settings.qmail_dir, VALIDRCPTTO_CDB=settings.cdb,
               TCPREMOTEIP="192.0.2.7")
    env.pop("RELAYCLIENT", None)
    done = subprocess.run([sys.executable, "-c", "from updater.smtpd.stdio import main; main()"],
                          input=b"".join(c + b"\r\n" for c in client), env=env,
                          capture_output=True, timeout=60)
    replies = done.stdout.decode("latin-1").split("\r\n")
    lines = ["  S: " + replies.pop(0)]
    for command in client:
        lines.append("  C: " + command.decode())
        while replies and replies[0][3:4] == "-":
            lines.append("  S: " + replies.pop(0))
        if replies:
            lines.append("  S: " + replies.pop(0))
    lines += ["", "its log (stderr):"] + ["  " + line for line in
                                          done.stderr.decode("latin-1").splitlines()]
    return lines
