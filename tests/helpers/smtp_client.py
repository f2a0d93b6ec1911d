"""A T1 conformance cdb, a qmail-queue stand-in, and a tcpserver running validrcptto-smtpd."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cdbx

from .net import free_port
from .tools import script

T1 = {
    b"joe@example.com": b"", b"joe-list-default@example.com": b"", b"postmaster": b"",
    b"abc-@example.com": b"", b"bob-default@example.com": b"",
    b"neg-default@example.com": b"-", b"x@example.net": b"+",
    b"-default@example.com": b"", b"@catchall.org": b"", b"blocked@catchall.org": b"-",
    b"@blockdom.net": b"-",
}
RCPTHOSTS = "example.com\nexample.net\ncatchall.org\nblockdom.net\nsub.catchall.org\n"

# A qmail-queue that stores what it is given: the message (fd 0) and envelope (fd 1);
# like the real one, it refuses (exit 91) an envelope that is not "F...\\0 ... \\0".
QUEUE = """#!{python}
import os, sys
out = os.environ.get("QQ_DIR", "{dir}")
msg = sys.stdin.buffer.read()
env = os.fdopen(1, "rb").read()
if not env.startswith(b"F") or not env.endswith(b"\\0\\0"):
    sys.exit(91)
n = len([f for f in os.listdir(out) if f.endswith(".msg")])
open(os.path.join(out, "%d.msg" % n), "wb").write(msg)
open(os.path.join(out, "%d.env" % n), "wb").write(env)
sys.exit(int(os.environ.get("QQ_EXIT", "0")))
"""


def make_cdb(path: Path, records: dict[bytes, bytes]) -> Path:
    maker = cdbx.CDB.make(str(path) + ".tmp")
    for k, v in records.items():
        maker.add(k, v)
    maker.commit().close()
    os.replace(str(path) + ".tmp", path)
    return path


def smtp_tree(root: Path) -> dict[str, str]:
    """control/ files, the T1 cdb and a queue program; returns the environment to use."""
    control = root / "qmail/control"
    control.mkdir(parents=True)
    (control / "me").write_text("mx.example.com\n")
    (control / "rcpthosts").write_text(RCPTHOSTS)
    make_cdb(control / "validrcptto.cdb", T1)
    queue_dir = root / "queue"
    queue_dir.mkdir()
    (root / "qmail/bin").mkdir()
    qq = root / "qmail/bin/qmail-queue"
    qq.write_text(QUEUE.replace("{python}", sys.executable).replace("{dir}", str(queue_dir)))
    qq.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VALIDRCPTTO_", "RELAYCLIENT", "TCP", "QMAIL"))}
    env.update(QMAIL_DIR=str(root / "qmail"), VALIDRCPTTO_CDB=str(control / "validrcptto.cdb"))
    return env






class Server:
    def __init__(self, env: dict, *args: str, nofile: int | None = None):
        self.port = free_port()
        self.lines: list[str] = []

        def limit():
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        self.proc = subprocess.Popen([script("validrcptto-smtpd"), "--listen",
                                      f"127.0.0.1:{self.port}", *args], env=env,
                                     stderr=subprocess.PIPE, text=True, preexec_fn=limit)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + 15
        while not any("listening on" in x for x in self.lines):
            assert self.proc.poll() is None, self.lines
            assert time.monotonic() < deadline, self.lines
            time.sleep(0.02)

    def connect(self, source: str = "127.0.0.1") -> Client:
        return Client(self.port, source)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def log(self) -> str:
        return "\n".join(self.lines)


class Client:
    def __init__(self, port: int, source: str = "127.0.0.1"):
        self.banner = b""
        self.sock = socket.socket()
        self.sock.settimeout(20)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                out, self.buf = self.buf, b""
                return out
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def reply(self) -> bytes:
        """One whole (possibly multi-line) reply."""
        out = b""
        while True:
            line = self.line()
            out += line
            if len(line) < 4 or line[3:4] != b"-":
                return out

    def cmd(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def greeted(port: int, source: str = "127.0.0.1", wait: float = 0.0) -> Client:
    """A client whose greeting has been read (``.banner``); ``wait``: seconds to keep
    trying while the server is not listening yet."""
    deadline = time.monotonic() + wait
    while True:
        try:
            c = Client(port, source)
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
    c.banner = c.reply()
    return c


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of every child process of ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append((int(entry), fields[0]))
    return out
