"""validrcptto-smtpd --listen as a production server: tcpserver's rules (compiled by the
real tcprules), limits, running out of descriptors, the cdb changing under open
sessions, SIGTERM draining, SIGHUP, privileges, workers, and the shipped service dir
under supervise."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers.net import free_port
from helpers.smtp_client import T1, Client, Server, children, make_cdb, smtp_tree
from helpers.tools import BIN, CI, need, script
from helpers.wait import wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return smtp_tree(tmp_path)


def relayed(c: Client) -> None:
    assert c.reply().startswith(b"220 ")
    assert c.cmd("HELO x").startswith(b"250 ")
    assert c.cmd("MAIL FROM:<a@example.org>") == b"250 ok\r\n"


# --------------------------------------------------------------------------- rules

def test_tcprules_deny_relayclient_and_default(env, tmp_path):
    tcprules = need("tcprules")
    rules = tmp_path / "tcp.smtp"
    rules.write_text('127.0.0.1:allow,RELAYCLIENT=""\n127.0.0.2:deny\n'
                     '127.0.0.4:allow,VALIDRCPTTO_LIMIT="1"\n:allow\n')
    cdb = tmp_path / "tcp.smtp.cdb"
    subprocess.run([tcprules, str(cdb), str(cdb) + ".tmp"], stdin=open(rules), check=True)
    srv = Server(env, "--rules", str(cdb))
    try:
        c = srv.connect("127.0.0.1")                  # RELAYCLIENT: no check, may relay
        relayed(c)
        assert c.cmd("RCPT TO:<nobody@example.com>") == b"250 ok\r\n"
        assert c.cmd("RCPT TO:<x@elsewhere.example>") == b"250 ok\r\n"
        c.close()
        denied = srv.connect("127.0.0.2")
        assert denied.sock.recv(100) == b""            # dropped without a banner
        other = srv.connect("127.0.0.3")               # the default rule
        relayed(other)
        assert other.cmd("RCPT TO:<nobody@example.com>").startswith(b"553 sorry, this")
        assert other.cmd("RCPT TO:<x@elsewhere.example>").startswith(b"553 sorry, that domain")
        assert other.cmd("RCPT TO:<joe@example.com>") == b"250 ok\r\n"
        other.close()
        strict = srv.connect("127.0.0.4")              # VALIDRCPTTO_LIMIT from the rule
        relayed(strict)
        assert strict.cmd("RCPT TO:<nobody@example.com>").startswith(b"421 too many invalid")
        # a new rules cdb takes effect at the next connection, no signal needed
        rules.write_text('127.0.0.3:deny\n:allow\n')
        subprocess.run([tcprules, str(cdb), str(cdb) + ".tmp"], stdin=open(rules), check=True)
        assert srv.connect("127.0.0.3").sock.recv(100) == b""
        log = srv.log()
        assert "deny " in log and "127.0.0.2:" in log
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


# --------------------------------------------------------------------------- limits

def test_two_thousand_idle_connections_with_1024_descriptors(env):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 8192), max(hard, 8192)))
    srv = Server(env, "--max-connections", "5000", "--max-per-ip", "0", "--quiet",
                 nofile=1024)
    socks = []
    try:
        first = srv.connect()
        assert first.reply().startswith(b"220 ")
        for _ in range(2000):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", srv.port))
            socks.append(s)
        time.sleep(3)
        assert srv.proc.poll() is None
        # an existing session still works while the server is out of descriptors
        assert first.cmd("HELO x").startswith(b"250 ")
        assert first.cmd("MAIL FROM:<a@example.org>") == b"250 ok\r\n"
        assert first.cmd("RCPT TO:<joe@example.com>") == b"250 ok\r\n"
        assert first.cmd("QUIT").startswith(b"221 ")
        for s in socks:
            s.close()
        socks = []
        time.sleep(2)                                 # accepting resumes after a pause
        again = srv.connect()
        assert again.reply().startswith(b"220 ")
        again.close()
    finally:
        for s in socks:
            s.close()
        assert srv.stop() == 0
    log = srv.log()
    assert "Traceback" not in log
    assert log.count("pausing accepts") <= 2, log


def test_per_ip_and_total_limits(env):
    srv = Server(env, "--max-connections", "4", "--max-per-ip", "2")
    try:
        a, b = srv.connect(), srv.connect()
        for c in (a, b):
            assert c.reply().startswith(b"220 ")
        third = srv.connect()
        assert third.reply() == (b"421 too many connections from your address, try again later "
                                 b"(#4.3.2)\r\n")
        c, d = srv.connect("127.0.0.5"), srv.connect("127.0.0.6")
        for x in (c, d):
            assert x.reply().startswith(b"220 ")
        assert srv.connect("127.0.0.7").reply() == \
            b"421 too many connections, try again later (#4.3.2)\r\n"
        a.close()
        time.sleep(0.3)
        e = srv.connect()
        assert e.reply().startswith(b"220 ")
    finally:
        assert srv.stop() == 0


# --------------------------------------------------------------------------- the cdb

def test_cdb_truncated_rewritten_and_replaced_under_fifty_sessions(env, tmp_path):
    cdb = tmp_path / "qmail/control/validrcptto.cdb"
    srv = Server(env, "--max-per-ip", "0")
    try:
        sessions = [srv.connect() for _ in range(50)]
        for c in sessions:
            relayed(c)
        old = cdb.read_bytes()
        with open(cdb, "r+b") as f:                     # truncated in place
            f.truncate(0)
        for c in sessions[:25]:
            assert c.cmd("RCPT TO:<joe@example.com>") == b"250 ok\r\n"
        late = srv.connect()                            # a torn file: the last whole one
        relayed(late)
        assert late.cmd("RCPT TO:<joe@example.com>") == b"250 ok\r\n"
        make_cdb(tmp_path / "new.cdb", {**T1, b"new@example.com": b""})
        data = (tmp_path / "new.cdb").read_bytes()
        with open(cdb, "r+b") as f:                     # rewritten in place, half, then all
            f.write(data[:len(data) // 2])
            f.flush()
            for c in sessions[25:40]:
                reply = c.cmd("RCPT TO:<joe@example.com>")
                assert reply == b"250 ok\r\n", reply
            f.write(data[len(data) // 2:])
        fresh = srv.connect()
        relayed(fresh)
        assert fresh.cmd("RCPT TO:<new@example.com>") == b"250 ok\r\n"
        cdb.write_bytes(old)
        make_cdb(cdb, T1)                               # replaced by rename
        for c in sessions[40:]:
            assert c.cmd("RCPT TO:<joe@example.com>") == b"250 ok\r\n"
            assert c.cmd("QUIT").startswith(b"221 ")
        last = srv.connect()
        relayed(last)
        assert last.cmd("RCPT TO:<new@example.com>").startswith(b"553 ")
        assert srv.proc.poll() is None
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


@pytest.mark.parametrize("broken", ["empty", "truncated", "garbage", "no-records"])
def test_a_cdb_that_was_never_whole_is_421_not_553(env, tmp_path, broken):
    """Started on a cdb that was never whole (or has no records, which the installer
    never writes): every session gets the 421 of unreadable controls, never a 553 for a
    listed address; a whole cdb renamed in is used by the next session."""
    cdb = tmp_path / "qmail/control/validrcptto.cdb"
    whole = cdb.read_bytes()
    if broken == "no-records":
        make_cdb(cdb, {})
    else:
        cdb.write_bytes({"empty": b"", "truncated": whole[:-5],
                         "garbage": bytes(range(256)) * 9}[broken])
    srv = Server(env)
    try:
        for _ in range(3):
            c = srv.connect()
            assert c.reply() == b"421 unable to read controls (#4.3.0)\r\n"
            c.close()
        make_cdb(cdb, T1)
        c = srv.connect()
        assert c.reply().startswith(b"220 ")
        assert c.cmd("HELO x").startswith(b"250")
        assert c.cmd("MAIL FROM:<a@b.example>") == b"250 ok\r\n"
        assert c.cmd("RCPT TO:<joe@example.com>") == b"250 ok\r\n"
        c.close()
    finally:
        assert srv.stop() == 0
    assert srv.log().count("validrcptto.cdb is ") == 1, srv.log()


def test_control_files_are_seen_without_a_signal(env, tmp_path):
    """A domain added to rcpthosts (as vadddomain adds it) is accepted by new sessions
    within a second, with no SIGHUP; an unreadable control file keeps the last good
    copy with one log line; a torn one (no final newline yet) too."""
    control = tmp_path / "qmail/control"
    make_cdb(control / "validrcptto.cdb", {**T1, b"joe@new.example": b""})
    srv = Server(env)

    def rcpt(address: str) -> bytes:
        c = srv.connect()
        try:
            assert c.reply().startswith(b"220 ")
            c.cmd("HELO x")
            c.cmd("MAIL FROM:<a@b.example>")
            return c.cmd(f"RCPT TO:<{address}>")
        finally:
            c.close()
    try:
        assert rcpt("joe@new.example").startswith(b"553 sorry, that domain isn't in my list")
        hosts = control / "rcpthosts"
        tmp = control / "rcpthosts.tmp"
        tmp.write_text(hosts.read_text() + "new.example\n")
        os.replace(tmp, hosts)
        wait_for(lambda: rcpt("joe@new.example") == b"250 ok\r\n", 5, "the new domain")
        assert rcpt("nobody@new.example").startswith(b"553 sorry, this recipient")
        (control / "databytes").mkdir()                  # unreadable: not a regular file
        wait_for(lambda: rcpt("joe@new.example") and "cannot read databytes" in srv.log(), 5,
                 "the unreadable file noticed")
        assert rcpt("joe@new.example") == b"250 ok\r\n"        # the last good copy
        # each file keeps its own copy: an unreadable databytes (a FIFO now) never holds
        # back a domain removed from rcpthosts
        (control / "databytes").rmdir()
        os.mkfifo(control / "databytes")
        whole = hosts.read_text()
        tmp.write_text(whole.replace("new.example\n", ""))
        os.replace(tmp, hosts)
        wait_for(lambda: rcpt("joe@new.example").startswith(b"553 sorry, that domain"), 5,
                 "the removal, beside an unreadable databytes")
        (control / "databytes").unlink()
        tmp.write_text(whole)
        os.replace(tmp, hosts)
        wait_for(lambda: rcpt("joe@new.example") == b"250 ok\r\n", 5, "the domain back")

        def young(log: str) -> bool:                     # the file kept being written
            os.utime(hosts)
            return rcpt("joe@new.example") == b"250 ok\r\n" and log in srv.log()
        with open(hosts, "r+") as f:                     # `cat new > rcpthosts`, step one
            f.truncate(0)
        wait_for(lambda: young("being written (emptied just now)"), 5, "the emptied file")
        hosts.write_text("exam")                         # caught mid-write
        wait_for(lambda: young("being written (no final newline yet)"), 5, "the torn file")
        assert rcpt("joe@new.example") == b"250 ok\r\n"
        os.utime(hosts, (time.time() + 60, time.time() + 60))   # from the future: taken
        wait_for(lambda: rcpt("joe@new.example").startswith(b"553 sorry, that domain"), 5,
                 "a list whose mtime is in the future")
        hosts.write_text(whole)
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


# --------------------------------------------------------------------------- lifecycle

def test_sigterm_drains_sessions_then_421(env):
    srv = Server(env, "--grace", "1.5")
    idle = [srv.connect() for _ in range(5)]
    for c in idle:
        relayed(c)
    busy = srv.connect()
    relayed(busy)
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(OSError):                        # no longer accepting
        socket.create_connection(("127.0.0.1", srv.port), timeout=2)
    assert busy.cmd("RCPT TO:<joe@example.com>") == b"250 ok\r\n"     # within the grace
    assert busy.cmd("QUIT").startswith(b"221 ")
    for c in idle:                                      # after it: one whole 421, then EOF
        assert c.reply() == b"421 service shutting down, closing connection (#4.3.2)\r\n"
        assert c.sock.recv(10) == b""
    assert srv.proc.wait(10) == 0
    assert 1.5 <= time.monotonic() - started < 6
    assert "Traceback" not in srv.log()


def test_workers_end_with_a_master_killed_by_sigkill(env):
    """``kill -9`` of the master under load: its workers get SIGTERM from the kernel,
    finish the sessions they hold within the grace period, and end; none is left
    accepting beside the next master's."""
    srv = Server(env, "--workers", "2", "--grace", "2")
    try:
        kids = wait_for(lambda: [int(p) for p, _ in children(srv.proc.pid)] if len(
            children(srv.proc.pid)) == 2 else None, 10, "two workers")
        busy = [srv.connect() for _ in range(6)]
        for c in busy:
            relayed(c)
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(10)
        killed = time.monotonic()
        for c in busy:                          # a session in progress is finished
            assert c.cmd("RCPT TO:<joe@example.com>") in (
                b"250 ok\r\n", b"421 service shutting down, closing transmission channel\r\n",
                b""), "a session dropped without a word"

        def gone(pid: int) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
            except OSError:
                return True
        wait_for(lambda: all(gone(p) for p in kids), 6, "the workers to end")
        assert time.monotonic() - killed < 2 + 3
        with pytest.raises(OSError):
            srv.connect()                       # nobody is accepting on the port
    finally:
        for p in kids if "kids" in locals() else []:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_user_workers_and_ipv6(env, tmp_path):
    need("setpriv")
    for p in [tmp_path, *tmp_path.parents]:            # the queue program must be reachable
        if p in (Path("/tmp"), Path("/")):
            break
        p.chmod(p.stat().st_mode | 0o711)
    os.chmod(tmp_path / "queue", 0o777)
    qq = tmp_path / "qmail/bin/qmail-queue"               # one nobody may run: sh, not ours
    qq.write_text(f"#!/bin/sh\nn=$(ls {tmp_path}/queue | grep -c msg)\n"
                  f"cat > {tmp_path}/queue/$n.msg && cat <&1 > {tmp_path}/queue/$n.env\n")
    srv = Server(env, "--user", "nobody", "--workers", "2")
    try:
        deadline = time.monotonic() + 10
        while True:
            kids = subprocess.run(["pgrep", "-P", str(srv.proc.pid)], capture_output=True,
                                  text=True).stdout.split()
            if len(kids) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(kids) == 2
        for pid in kids + [str(srv.proc.pid)]:
            status = Path(f"/proc/{pid}/status").read_text()
            uid = next(line for line in status.splitlines() if line.startswith("Uid:"))
            groups = next(line for line in status.splitlines() if line.startswith("Groups:"))
            assert uid.split()[1:] == ["65534"] * 4 and groups.split()[1:] == []
        for _ in range(6):
            c = srv.connect()
            relayed(c)
            assert c.cmd("RCPT TO:<joe@example.com>") == b"250 ok\r\n"
            assert c.cmd("DATA").startswith(b"354 ")
            c.sock.sendall(b"Subject: x\r\n\r\nhello\r\n.\r\n")
            assert c.reply().startswith(b"250 ok ")
            c.close()
        assert len(list((tmp_path / "queue").glob("*.msg"))) == 6
    finally:
        assert srv.stop() == 0
    if socket.has_ipv6:
        port = free_port()
        proc = subprocess.Popen([script("validrcptto-smtpd"), "--listen", f"[::1]:{port}"],
                                env=env, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    s = socket.create_connection(("::1", port), timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        if CI:
                            pytest.fail("no IPv6 loopback: required under CI=true")
                        pytest.skip("no IPv6 loopback here")
                    time.sleep(0.05)
            assert s.recv(100).startswith(b"220 ")
            s.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0


def test_shipped_service_under_supervise_and_svc_h(env, tmp_path):
    svscan, svok, svc = (need(t) for t in ("svscan", "svok", "svc"))
    tcprules = need("tcprules")
    rules = tmp_path / "tcp.smtp.cdb"
    subprocess.run([tcprules, str(rules), str(rules) + ".tmp"], input=b":allow\n", check=True)
    services = tmp_path / "services"
    svcdir = services / "validrcptto-smtpd"
    shutil.copytree(ROOT / "service/validrcptto-smtpd", svcdir)
    port = free_port()
    settings = dict(QMAIL_DIR=env["QMAIL_DIR"], VALIDRCPTTO_CDB=env["VALIDRCPTTO_CDB"],
                    TCPRULES=str(rules), IP="127.0.0.1", PORT=str(port), SMTPD_USER="",
                    WORKERS="1", PATH=f"{BIN}:/usr/bin:/bin")
    for name, value in settings.items():
        (svcdir / "env" / name).write_text(f"{value}\n")
    scan = subprocess.Popen([svscan, str(services)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def greeting() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                return s.recv(100)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert greeting() == b"220 mx.example.com ESMTP\r\n"
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        control = Path(env["QMAIL_DIR"]) / "control"
        (control / "smtpgreeting").write_text("changed.example\n")
        deadline = time.monotonic() + 10            # seen without a signal
        while greeting() != b"220 changed.example ESMTP\r\n":
            assert time.monotonic() < deadline, (svcdir / "log/main/current").read_text()
            time.sleep(0.1)
        subprocess.run([svc, "-h", str(svcdir)], check=True)    # supervise passes it on
        wait_for(lambda: "SIGHUP: re-reading controls, rules and the TLS certificate" in
                 (svcdir / "log/main/current").read_text(), 10, "the SIGHUP line")
        subprocess.run([tcprules, str(rules), str(rules) + ".tmp"], input=b":deny\n",
                       check=True)
        assert greeting() == b""
    finally:
        scan.terminate()
        scan.wait()
        subprocess.run([svc, "-dx", str(svcdir), str(svcdir / "log")])


def test_read_timeout_in_listen_mode(env, tmp_path):
    (tmp_path / "qmail/control/timeoutsmtpd").write_text("1\n")
    srv = Server(env)
    try:
        c = srv.connect()
        assert c.reply().startswith(b"220 ")
        started = time.monotonic()
        assert c.reply() == b"451 timeout (#4.4.2)\r\n"      # qmail's words, then EOF
        assert 1 <= time.monotonic() - started < 3
        assert c.sock.recv(10) == b""
        busy = srv.connect()                                  # each command restarts it
        busy.reply()
        for _ in range(4):
            time.sleep(0.6)
            assert busy.cmd("NOOP") == b"250 ok\r\n"
    finally:
        assert srv.stop() == 0
