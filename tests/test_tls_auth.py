"""STARTTLS and SMTP AUTH on both front ends (under tcpserver and --listen), with the
real tools: a certificate from `openssl req`, `swaks --tls`, `openssl s_client
-starttls smtp`, and Debian's `checkpw` as the checkpassword program."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers.net import free_port
from helpers.smtp_client import smtp_tree
from helpers.tools import CI, need, script

USER, PASSWORD = "vrtauth", "s3cret-Pa55"


@pytest.fixture
def cert(tmp_path: Path) -> Path:
    openssl = need("openssl")
    d = tmp_path / "tls"
    d.mkdir()
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=mx.example.com", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True)
    pem = d / "servercert.pem"
    pem.write_bytes((d / "cert.pem").read_bytes() + (d / "key.pem").read_bytes())
    pem.chmod(0o600)
    return pem


@pytest.fixture
def account(tmp_path: Path):
    """A system account whose ~/Maildir/.password checkpw reads (root only: useradd)."""
    if os.geteuid() != 0:
        if CI:
            pytest.fail("the AUTH tests need root (useradd) under CI")
        pytest.skip("needs root")
    need("checkpw")
    home = tmp_path / "authhome"
    (home / "Maildir").mkdir(parents=True)
    subprocess.run(["userdel", USER], capture_output=True)
    subprocess.run([need("useradd"), "-M", "-d", str(home), "-s", "/bin/false", USER],
                   check=True)
    pw = home / "Maildir/.password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    shutil.chown(pw, USER)
    yield USER
    subprocess.run(["userdel", USER], capture_output=True)


class Front:
    """One of the two front ends on a port, with the cert and checkpw configured."""

    def __init__(self, kind: str, tmp_path: Path, env: dict, cert: Path | None, **extra):
        self.kind, self.port = kind, free_port()
        self.lines: list[str] = []
        env = {**env, "CHECKPASSWORD": need("checkpw"), **extra}
        if cert is not None:
            shutil.copy(cert, Path(env["QMAIL_DIR"]) / "control/servercert.pem")
        if kind == "listen":
            argv = [script("validrcptto-smtpd"), "--listen", f"127.0.0.1:{self.port}"]
        else:
            argv = [need("tcpserver"), "-R", "-H", "-l", "mx.example.com", "127.0.0.1",
                    str(self.port), script("validrcptto-smtpd")]
        self.proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, self.lines
                time.sleep(0.05)

    def log(self) -> str:
        time.sleep(0.2)
        return "".join(self.lines)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)


@pytest.fixture(params=["listen", "tcpserver"])
def front(request, tmp_path: Path, cert: Path):
    env = smtp_tree(tmp_path)
    made: list[Front] = []

    def start(with_cert: bool = True, **extra) -> Front:
        f = Front(request.param, tmp_path, env, cert if with_cert else None, **extra)
        made.append(f)
        return f
    start.tmp_path = tmp_path
    yield start
    for f in made:
        f.stop()


def swaks(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need("swaks"), "--server", f"127.0.0.1:{port}", "--from",
                           "a@example.org", "--helo", "client.example", *args],
                          capture_output=True, text=True, timeout=60)


class Raw:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""

    def reply(self) -> bytes:
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(4096)
                if not chunk:
                    return out + self.buf
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\r\n")
            out += line + b"\r\n"
            if len(line) < 4 or line[3:4] != b"-":
                return out

    def cmd(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def starttls(self) -> None:
        assert self.cmd("STARTTLS") == b"220 ready for tls\r\n"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(self.sock, server_hostname="mx.example.com")


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# --------------------------------------------------------------------------- STARTTLS

def test_swaks_tls_delivers_with_the_right_envelope(front):
    f = front()
    done = swaks(f.port, "--tls", "--to", "joe@example.com", "--body", "hello over tls")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "STARTTLS" in done.stdout and "TLS started" in done.stdout
    queue = front.tmp_path / "queue"
    assert (queue / "0.env").read_bytes() == b"Fa@example.org\0Tjoe@example.com\0\0"
    msg = (queue / "0.msg").read_bytes()
    assert b" with ESMTPS; " in msg.split(b"\n\n")[0] and b"hello over tls" in msg


def test_openssl_s_client_handshake_then_ehlo_again(front):
    f = front()
    done = subprocess.run([need("openssl"), "s_client", "-starttls", "smtp", "-connect",
                           f"127.0.0.1:{f.port}", "-crlf", "-ign_eof"],
                          input="EHLO again.example\nQUIT\n", capture_output=True, text=True,
                          timeout=60)
    out = done.stdout
    assert "BEGIN CERTIFICATE" in out and ("TLSv1.3" in out or "TLSv1.2" in out), out
    after = out[out.index("250-mx.example.com"):] if "250-mx.example.com" in out else ""
    assert "250-AUTH LOGIN PLAIN" in after and "STARTTLS" not in after, out
    assert "221 mx.example.com" in out


def test_starttls_rules(front):
    f = front()
    r = Raw(f.port)
    assert r.reply().startswith(b"220 ")
    ehlo = r.cmd("EHLO x")
    assert b"STARTTLS\r\n" in ehlo and b"AUTH" not in ehlo           # no AUTH before TLS
    assert r.cmd("AUTH PLAIN " + plain(USER, PASSWORD)).startswith(b"538 ")
    r.sock.sendall(b"STARTTLS\r\nNOOP\r\n")                         # pipelined: refused
    assert r.reply() == b"501 nothing may follow STARTTLS before the handshake (#5.5.1)\r\n"
    r.starttls()
    assert r.cmd("MAIL FROM:<a@example.org>") == b"250 ok\r\n"      # state was reset...
    assert r.cmd("EHLO y").count(b"STARTTLS") == 0
    assert r.cmd("STARTTLS") == b"454 TLS already active (#4.7.0)\r\n"


def test_no_certificate_or_disabletls_means_no_starttls(front):
    f = front(with_cert=False)
    r = Raw(f.port)
    r.reply()
    assert b"STARTTLS" not in r.cmd("EHLO x")
    assert r.cmd("STARTTLS") == b"502 unimplemented (#5.5.1)\r\n"
    g = front(DISABLETLS="1")
    r = Raw(g.port)
    r.reply()
    assert b"STARTTLS" not in r.cmd("EHLO x")


def test_unreadable_certificate_is_one_log_line(front, tmp_path):
    bad = tmp_path / "broken.pem"
    bad.write_text("not a certificate\n")
    f = front(with_cert=False, TLS_CERT=str(bad))
    r = Raw(f.port)
    r.reply()
    assert b"STARTTLS" not in r.cmd("EHLO x")
    r.cmd("QUIT")
    assert f.log().count("TLS: cannot load the certificate") >= 1


# --------------------------------------------------------------------------- AUTH

def test_auth_plain_and_login_with_checkpw_bypass_the_check(front, account):
    f = front()
    before = swaks(f.port, "--tls", "--to", "nobody@example.com")
    assert before.returncode != 0 and "553 sorry, this recipient" in before.stdout
    for mech in ("PLAIN", "LOGIN"):
        done = swaks(f.port, "--tls", "--auth", mech, "--auth-user", USER, "--auth-password",
                     PASSWORD, "--to", "nobody@example.com,x@elsewhere.example")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "235 ok, go ahead (#2.0.0)" in done.stdout
    wrong = swaks(f.port, "--tls", "--auth", "PLAIN", "--auth-user", USER, "--auth-password",
                  "wrong-pass", "--to", "joe@example.com")
    assert wrong.returncode != 0 and "535 authorization failed (#5.7.0)" in wrong.stdout
    msgs = sorted((front.tmp_path / "queue").glob("*.msg"))
    assert msgs and b" with ESMTPSA; " in msgs[-1].read_bytes()
    log = f.log()
    assert f"AUTH ok user {USER}" in log and f"AUTH failed user {USER}" in log
    assert PASSWORD not in log and "wrong-pass" not in log


def test_failed_attempt_limit_and_plaintext_switch(front, account):
    f = front(AUTH_PLAINTEXT="1", AUTH_MAX_FAILURES="2")
    r = Raw(f.port)
    r.reply()
    assert b"250-AUTH LOGIN PLAIN" in r.cmd("EHLO x")              # offered without TLS
    assert r.cmd("AUTH PLAIN " + plain(USER, "nope1")).startswith(b"535 ")
    assert r.cmd("AUTH PLAIN !!!notbase64") == b"501 malformed auth input (#5.5.4)\r\n"
    assert r.cmd("AUTH CRAM-MD5") == b"504 auth type unimplemented (#5.5.1)\r\n"
    assert r.cmd("AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
    assert r.cmd("*") == b"501 auth exchange cancelled (#5.0.0)\r\n"
    assert r.cmd("AUTH PLAIN " + plain(USER, "nope2")) == \
        b"421 too many authentication failures, closing connection (#4.7.0)\r\n"
    assert r.sock.recv(10) == b""


def test_hanging_checkpassword_is_a_temporary_failure(front, tmp_path):
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nexec sleep 60\n")
    hang.chmod(0o755)
    f = front(AUTH_PLAINTEXT="1", CHECKPASSWORD_TIMEOUT="1", CHECKPASSWORD=str(hang))
    r = Raw(f.port)
    r.reply()
    r.cmd("EHLO x")
    started = time.monotonic()
    assert r.cmd("AUTH PLAIN " + plain(USER, PASSWORD)) == \
        b"454 temporary authentication failure (#4.3.0)\r\n"
    assert time.monotonic() - started < 5
    assert r.cmd("NOOP") == b"250 ok\r\n"
    assert PASSWORD not in f.log()
