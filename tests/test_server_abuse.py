"""validrcptto-smtpd --listen against what a remote client (or a crash) can do to it:
a client that never reads, sessions that hang up in the middle of AUTH or DATA, a
worker killed while it holds sessions, a rules file that is not a cdb, and the
environment its child programs get (diffed against real tcpserver)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers.net import free_port
from helpers.smtp_client import Server, children, smtp_tree
from helpers.tools import need, script


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return smtp_tree(tmp_path)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settle(pid: int, fd_count: int, seconds: float = 15) -> tuple[int, list]:
    """Wait until the server holds no more descriptors and no children than before."""
    deadline = time.monotonic() + seconds
    while True:
        n, kids = fds(pid), children(pid)
        if (n <= fd_count and not kids) or time.monotonic() > deadline:
            return n, kids
        time.sleep(0.2)


def session_start(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = s.recv(4096)
        assert chunk, "closed before the banner"
        buf += chunk
    assert buf.startswith(b"220 "), buf
    return s


def expect(s: socket.socket, prefix: bytes) -> bytes:
    buf = b""
    while True:
        chunk = s.recv(4096)
        assert chunk, (prefix, buf)
        buf += chunk
        lines = buf.split(b"\r\n")
        if len(lines) > 1 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            assert buf.startswith(prefix), (prefix, buf)
            return buf


# --------------------------------------------------------------------------- 1

def test_a_client_that_never_reads_cannot_grow_the_server(env):
    """HELP, EHLO and unknown commands reply with more bytes than they take; a client
    that pipelines them without reading must make the server stop reading, not buffer
    replies without end, and is dropped after --write-timeout."""
    srv = Server(env, "--write-timeout", "4", "--max-per-ip", "0")
    try:
        before = rss_kb(srv.proc.pid)
        flooders = []
        sent = [0] * 5

        def flood(i: int) -> None:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", srv.port))
            s.settimeout(1.0)
            chunk = (b"HELP\r\n" * 5000 + b"\n" * 5000 + b"EHLO x\r\n" * 2000)
            deadline = time.monotonic() + 12
            try:
                while time.monotonic() < deadline:
                    try:
                        sent[i] += s.send(chunk)
                    except TimeoutError:
                        continue
            except OSError:
                pass                                  # dropped: what we want
            flooders.append(s)

        threads = [threading.Thread(target=flood, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        peak = before
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss_kb(srv.proc.pid))
            time.sleep(0.1)
        for t in threads:
            t.join()
        grown = peak - before
        # five sessions, each bounded by one read + the write buffer + one batch
        assert grown < 20_000, f"RSS grew {grown} kB under 5 non-reading clients"
        # the server stopped reading: the clients could not push much past the
        # socket buffers (each would have sent hundreds of MB otherwise)
        assert max(sent) < 50_000_000, sent
        assert "has not read for 4s; dropped" in srv.log()
        for s in flooders:
            s.close()
        c = srv.connect()
        assert c.reply().startswith(b"220 ")          # and it still serves
        c.close()
    finally:
        srv.stop()


# --------------------------------------------------------------------------- 2, 4

HANG = "#!/bin/sh\nexec sleep 60\n"
SLOW_QUEUE = "#!/bin/sh\ncat >/dev/null\nexec sleep 3\n"


def abusive(port: int, kind: str) -> None:
    s = session_start(port)
    try:
        if kind == "auth":
            s.sendall(b"EHLO x\r\n")
            expect(s, b"250")
            s.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0user\0password") + b"\r\n")
            time.sleep(0.01)                      # checkpassword is running
            s.shutdown(socket.SHUT_WR)
        else:
            for cmd, code in ((b"HELO x", b"250"), (b"MAIL FROM:<a@b.example>", b"250"),
                              (b"RCPT TO:<joe@example.com>", b"250"), (b"DATA", b"354")):
                s.sendall(cmd + b"\r\n")
                expect(s, code)
            body = b"Subject: x\r\n\r\n" + b"line\r\n" * 50
            s.sendall(body if kind == "partial" else body + b".\r\n")
            time.sleep(0.01)
    finally:
        s.close()


@pytest.mark.parametrize("kind", ["auth", "partial", "whole"])
def test_sessions_that_hang_up_leave_no_process_or_descriptor(env, tmp_path, kind):
    """500 sessions that hang up while checkpassword runs, in the middle of a message,
    or right after the final dot: afterwards the server holds as many descriptors as
    before and has no child at all (no zombie, no orphaned qmail-queue)."""
    prog = tmp_path / "prog"
    prog.write_text(HANG if kind == "auth" else SLOW_QUEUE)
    prog.chmod(0o755)
    extra = {"CHECKPASSWORD": str(prog), "AUTH_PLAINTEXT": "1", "CHECKPASSWORD_TIMEOUT": "60"} \
        if kind == "auth" else {"QMAILQUEUE": str(prog)}
    srv = Server({**env, **extra}, "--max-per-ip", "0", "--max-connections", "2000", "--quiet")
    try:
        pid = srv.proc.pid
        c = srv.connect()                   # the cdb snapshots are taken once, here
        assert c.reply().startswith(b"220 ")
        c.close()
        time.sleep(0.2)
        base = fds(pid)
        threads = []
        for _ in range(500):
            t = threading.Thread(target=abusive, args=(srv.port, kind))
            t.start()
            threads.append(t)
            if len(threads) >= 25:
                threads.pop(0).join()
        for t in threads:
            t.join()
        n, kids = settle(pid, base)
        assert kids == [], f"{len(kids)} children left, states {sorted({k[1] for k in kids})}"
        assert n <= base, f"{n - base} descriptors leaked"
        c = srv.connect()                             # and it still serves
        assert c.reply().startswith(b"220 ")
        c.close()
    finally:
        srv.stop()


# --------------------------------------------------------------------------- 3

def test_a_killed_worker_gives_back_its_connection_slots(env):
    srv = Server(env, "--workers", "2", "--max-per-ip", "4", "--max-connections", "6")
    try:
        deadline = time.monotonic() + 10
        while len(children(srv.proc.pid)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        held = [srv.connect("127.0.0.1") for _ in range(4)] + \
            [srv.connect("127.0.0.2") for _ in range(2)]
        for c in held:
            assert c.reply().startswith(b"220 ")
        over = srv.connect("127.0.0.1")
        assert over.reply().startswith(b"421 too many connections")
        over.close()
        workers = [p for p, _ in children(srv.proc.pid)]
        for p in workers:
            os.kill(p, signal.SIGKILL)
        for c in held:
            c.close()
        deadline = time.monotonic() + 15
        while srv.log().count("starting another") < 2 or \
                len(children(srv.proc.pid)) < 2:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
        time.sleep(0.3)
        again = [srv.connect("127.0.0.1") for _ in range(4)] + \
            [srv.connect("127.0.0.3") for _ in range(2)]
        for c in again:
            assert c.reply().startswith(b"220 "), srv.log()
        for c in again:
            c.close()
    finally:
        srv.stop()


# --------------------------------------------------------------------------- 5

def compile_rules(tmp_path: Path, text: str, name: str = "rules") -> Path:
    src = tmp_path / name
    src.write_text(text)
    cdb = tmp_path / f"{name}.cdb"
    subprocess.run([need("tcprules"), str(cdb), str(cdb) + ".tmp"], stdin=open(src), check=True)
    return cdb


def dropped(srv: Server) -> bool:
    c = srv.connect()
    try:
        return c.sock.recv(100) == b""
    except ConnectionResetError:
        return True
    finally:
        c.close()


@pytest.mark.parametrize("bad", ["urandom", "text"])
def test_rules_that_are_not_a_cdb_drop_every_connection(env, tmp_path, bad):
    rules = tmp_path / "tcp.smtp.cdb"
    if bad == "urandom":
        rules.write_bytes(os.urandom(5000))
    else:
        rules.write_text('127.:allow,RELAYCLIENT=""\n:deny\n')
    srv = Server(env, "--rules", str(rules))
    try:
        assert f"cannot read rules {rules}: not a cdb" in srv.log()
        for _ in range(3):
            assert dropped(srv)
        assert f"deny 1 127.0.0.1:{srv.port} 127.0.0.1:" in srv.log()
        # one line at start and one for the first drop, then one a minute at most
        assert srv.log().count(f"cannot read rules {rules}: not a cdb") == 2, srv.log()
        assert "every connection is dropped until it is fixed (1 so far)" in srv.log()
        good = compile_rules(tmp_path, ":allow\n", "good")
        os.replace(good, rules)                        # a whole one is picked up
        c = srv.connect()
        assert c.reply().startswith(b"220 ")
        c.close()
        assert f"rules {rules} readable again: 3 connection(s) were dropped" in srv.log()
        torn = tmp_path / "torn"                       # and broken again on a re-read
        torn.write_bytes(os.urandom(3000))
        os.replace(torn, rules)
        assert dropped(srv)
    finally:
        srv.stop()


# --------------------------------------------------------------------------- 6

DUMP = """#!{python}
import json, os, sys
path = os.environ["DUMP_TO"] + "." + sys.argv[0].rsplit("/", 1)[-1]
with open(path, "w") as f:
    json.dump(dict(os.environ), f)
if sys.argv[0].endswith("qq"):
    os.execv("{queue}", ["{queue}"])
sys.exit(1)
"""


def session_env(env: dict, tmp_path: Path, front: str) -> tuple[dict, dict]:
    """What qmail-queue and checkpassword see from one session under ``front``."""
    dump = tmp_path / f"dump-{front}"
    qq = tmp_path / "qq"
    cp = tmp_path / "cp"
    for p in (qq, cp):
        p.write_text(DUMP.replace("{python}", sys.executable).replace(
            "{queue}", env["QMAIL_DIR"] + "/bin/qmail-queue"))
        p.chmod(0o755)
    rules = compile_rules(tmp_path, f'127.0.0.1:allow,QMAILQUEUE="{qq}",SIMSCAN_DEBUG="2",'
                          f'RELAYCLIENT="",AUTH_PLAINTEXT="1",DUMP_TO="{dump}"\n:allow\n')
    port = free_port()
    server_env = {**env, "CHECKPASSWORD": str(cp), "TCPREMOTEHOST": "leak.example",
                  "TCPREMOTEINFO": "leak", "QMAILQUEUE": "/nonexistent/qq"}
    if front == "tcpserver":
        proc = subprocess.Popen([need("tcpserver"), "-HR", "-l", "mx.example.com", "-x",
                                 str(rules), "127.0.0.1", str(port),
                                 script("validrcptto-smtpd")],
                                env=server_env, stderr=subprocess.DEVNULL)
        srv = None
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    else:
        srv = Server({**server_env, "RELAYCLIENT": "server-own", "TCPLOCALPORT": "1"},
                     "--rules", str(rules))
        port, proc = srv.port, srv.proc
    try:
        s = session_start(port)
        s.sendall(b"EHLO x\r\n")
        expect(s, b"250")
        s.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0u\0p") + b"\r\n")
        expect(s, b"535")
        s.sendall(b"MAIL FROM:<a@b.example>\r\n")
        expect(s, b"250")
        s.sendall(b"RCPT TO:<x@anywhere.example>\r\n")
        expect(s, b"250")
        s.sendall(b"DATA\r\n")
        expect(s, b"354")
        s.sendall(b"Subject: env\r\n\r\nhi\r\n.\r\n")
        expect(s, b"250 ok")
        s.sendall(b"QUIT\r\n")
        s.close()
    finally:
        if srv is not None:
            srv.stop()
        else:
            proc.terminate()
            proc.wait(10)
    got = []
    for name in ("qq", "cp"):
        e = json.loads(Path(f"{dump}.{name}").read_text())
        for k in ("TCPREMOTEPORT", "TCPLOCALPORT"):
            assert e.pop(k).isdigit()
        got.append(e)
    return got[0], got[1]


def test_child_programs_get_the_session_environment_as_under_tcpserver(env, tmp_path):
    ref_qq, ref_cp = session_env(env, tmp_path, "tcpserver")
    our_qq, our_cp = session_env(env, tmp_path, "listen")
    for ref, ours in ((ref_qq, our_qq), (ref_cp, our_cp)):
        ours["DUMP_TO"] = ref["DUMP_TO"] = "-"
        assert ours == ref, {k: (ref.get(k), ours.get(k))
                             for k in set(ref) | set(ours) if ref.get(k) != ours.get(k)}
    assert our_qq["SIMSCAN_DEBUG"] == "2" and our_qq["RELAYCLIENT"] == ""
    assert our_qq["QMAILQUEUE"].endswith("/qq") and our_qq["PROTO"] == "TCP"
    assert our_qq["TCPREMOTEIP"] == "127.0.0.1" and "TCPREMOTEHOST" not in our_qq
