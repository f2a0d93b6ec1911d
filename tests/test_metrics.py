"""validrcptto-smtpd --listen --metrics: a real server with two workers driven through
every outcome by real clients (a socket client, swaks, Python's ssl), then /metrics
scraped over HTTP: each counter moved by exactly what was done, and a SIGKILLed worker
takes none of them with it."""

from __future__ import annotations

import base64
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from helpers.net import free_port
from helpers.smtp_client import Server, children, greeted, smtp_tree
from helpers.tools import need


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_every_counter_moves_by_exactly_what_happened(tmp_path: Path):
    env = smtp_tree(tmp_path)
    control = Path(env["QMAIL_DIR"]) / "control"
    (control / "badmailfrom").write_text("spammer@bad.example\n")
    openssl, tcprules = need("openssl"), need("tcprules")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=mx.example.com", "-keyout", str(tmp_path / "k.pem"),
                    "-out", str(tmp_path / "c.pem")], check=True, capture_output=True)
    (control / "servercert.pem").write_bytes((tmp_path / "c.pem").read_bytes() +
                                             (tmp_path / "k.pem").read_bytes())
    checkpw = tmp_path / "checkpw"
    checkpw.write_text('#!/bin/sh\nread -r x <&3 2>/dev/null\ncase "$x" in\n'
                       '  *good*) exit 0 ;;\n  *slow*) exec sleep 30 ;;\n  *) exit 1 ;;\nesac\n')
    checkpw.chmod(0o755)
    rules = tmp_path / "rules"
    rules.write_text('127.0.0.2:deny\n127.0.0.3:allow,RELAYCLIENT=""\n'
                     '127.0.0.4:allow,QQ_EXIT="31"\n127.0.0.5:allow,QQ_EXIT="71"\n'
                     '127.0.0.6:allow,VALIDRCPTTO_LIMIT="2"\n:allow\n')
    subprocess.run([tcprules, str(rules) + ".cdb", str(rules) + ".tmp"], stdin=open(rules),
                   check=True)
    mport = free_port()
    srv = Server({**env, "CHECKPASSWORD": str(checkpw), "AUTH_PLAINTEXT": "1",
                  "AUTH_MAX_FAILURES": "2", "CHECKPASSWORD_TIMEOUT": "1"},
                 "--workers", "2", "--metrics", f"127.0.0.1:{mport}", "--max-per-ip", "3",
                 "--rules", str(rules) + ".cdb")
    try:
        before = scrape(mport)
        p = srv.port
        # RCPT outcomes, one session
        s = greeted(p)
        s.cmd("HELO x")
        assert s.cmd("RCPT TO:<joe@example.com>").startswith(b"503")          # syntax
        s.cmd("MAIL FROM:<a@b.example>")
        assert s.cmd("RCPT TO:<joe@example.com>").startswith(b"250")          # accepted
        assert s.cmd("RCPT TO:<nobody@example.com>").startswith(b"553")       # validrcptto
        assert s.cmd("RCPT TO:<x@elsewhere.example>").startswith(b"553")      # rcpthosts
        assert s.cmd(f"RCPT TO:<{'a' * 900}@example.com>").startswith(b"555")  # syntax
        s.cmd("MAIL FROM:<spammer@bad.example>")
        assert s.cmd("RCPT TO:<joe@example.com>").startswith(b"553")          # badmailfrom
        s.cmd("MAIL FROM:<a@b.example>")                                      # a message
        s.cmd("RCPT TO:<joe@example.com>")
        assert s.cmd("DATA").startswith(b"354")
        assert s.cmd("Subject: x\r\n\r\nhi\r\n.").startswith(b"250 ok")      # 15 bytes
        assert s.cmd("QUIT").startswith(b"221")
        s.close()
        # a relay client, a permanent and a temporary qmail-queue failure
        for source, answer in (("127.0.0.3", b"250"), ("127.0.0.4", b"554"),
                               ("127.0.0.5", b"451")):
            s = greeted(p, source)
            s.cmd("HELO x")
            s.cmd("MAIL FROM:<a@b.example>")
            assert s.cmd("RCPT TO:<x@elsewhere.example>" if source == "127.0.0.3"
                         else "RCPT TO:<joe@example.com>").startswith(b"250")
            assert s.cmd("DATA").startswith(b"354")
            assert s.cmd("Subject: x\r\n\r\nhi\r\n.").startswith(answer), source
            s.close()                                                         # error end
        # the invalid-recipient limit
        s = greeted(p, "127.0.0.6")
        s.cmd("HELO x")
        s.cmd("MAIL FROM:<a@b.example>")
        assert s.cmd("RCPT TO:<n1@example.com>").startswith(b"553")
        assert s.cmd("RCPT TO:<n2@example.com>").startswith(b"421")
        s.close()
        # AUTH: ok, failed twice (hang-up), temporary; then STARTTLS
        s = greeted(p)
        s.cmd("EHLO x")
        plain = lambda who: base64.b64encode(b"\0" + who + b"\0pw").decode()
        assert s.cmd("AUTH PLAIN " + plain(b"good")).startswith(b"235")
        s.cmd("QUIT")
        s.close()
        s = greeted(p)
        s.cmd("EHLO x")
        assert s.cmd("AUTH PLAIN " + plain(b"slow")).startswith(b"454")
        assert s.cmd("AUTH PLAIN " + plain(b"bad")).startswith(b"535")
        assert s.cmd("AUTH PLAIN " + plain(b"bad")).startswith(b"421")
        s.close()
        s = greeted(p)
        s.cmd("EHLO x")
        assert s.cmd("STARTTLS").startswith(b"220")
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        tls = ctx.wrap_socket(s.sock, server_hostname="mx.example.com")
        tls.sendall(b"EHLO x\r\n")
        assert tls.recv(4096).startswith(b"250")
        tls.sendall(b"QUIT\r\n")
        tls.recv(4096)
        tls.close()
        # refused connections: a deny rule, then more than 3 from one address
        with socket.socket() as d:
            d.bind(("127.0.0.2", 0))
            d.connect(("127.0.0.1", p))
            assert d.recv(100) == b""
        held = [greeted(p, "127.0.0.7") for _ in range(3)]
        extra = greeted(p, "127.0.0.7")
        assert extra.banner.startswith(b"421 too many connections from your address")
        extra.close()
        for h in held:
            h.close()
        time.sleep(1.0)
        after = scrape(mport)
        moved = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        want = {
            'validrcptto_smtpd_rcpt_total{reason="validrcptto",result="accepted"}': 4,
            'validrcptto_smtpd_rcpt_total{reason="validrcptto",result="rejected"}': 3,
            'validrcptto_smtpd_rcpt_total{reason="rcpthosts",result="rejected"}': 1,
            'validrcptto_smtpd_rcpt_total{reason="syntax",result="rejected"}': 2,
            'validrcptto_smtpd_rcpt_total{reason="badmailfrom",result="rejected"}': 1,
            'validrcptto_smtpd_rcpt_total{reason="relayclient",result="accepted"}': 1,
            'validrcptto_smtpd_messages_total{result="queued"}': 2,
            'validrcptto_smtpd_messages_total{result="rejected"}': 1,
            'validrcptto_smtpd_messages_total{result="tempfail"}': 1,
            'validrcptto_smtpd_bytes_received_total': 4 * 15,
            'validrcptto_smtpd_hangups_total{reason="invalid_limit"}': 1,
            'validrcptto_smtpd_hangups_total{reason="auth_failures"}': 1,
            'validrcptto_smtpd_auth_total{result="ok"}': 1,
            'validrcptto_smtpd_auth_total{result="failed"}': 2,
            'validrcptto_smtpd_auth_total{result="tempfail"}': 1,
            'validrcptto_smtpd_tls_sessions_total': 1,
            'validrcptto_smtpd_connections_refused_total{reason="rules"}': 1,
            'validrcptto_smtpd_connections_refused_total{reason="per_ip"}': 1,
            'validrcptto_smtpd_connections_refused_total{reason="busy"}': 0,
            'validrcptto_smtpd_sessions_total{end="quit"}': 3,
            'validrcptto_smtpd_sessions_total{end="limit"}': 2,
            'validrcptto_smtpd_sessions_total{end="error"}': 3 + 3,
            'validrcptto_smtpd_session_duration_seconds_count': 11,
            'validrcptto_smtpd_sessions_open': 0,
        }
        wrong = {k: (moved.get(k), v) for k, v in want.items() if moved.get(k) != v}
        assert not wrong, wrong
        assert after["validrcptto_cdb_entries"] == 11
        assert 0 <= after["validrcptto_cdb_snapshot_age_seconds"] < 600
        # the workers and the metrics process killed with SIGKILL: no count is lost
        killed = [pid for pid, _ in children(srv.proc.pid)]
        assert len(killed) == 3
        for w in killed:
            os.kill(w, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while srv.log().count("starting another") < 3:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
        while True:
            try:
                kept = scrape(mport)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        for k in want:
            if not k.endswith("_open"):
                assert kept[k] == after[k], k
        s = greeted(p)                              # the new workers serve and count
        s.cmd("QUIT")
        s.close()
        time.sleep(0.5)
        assert scrape(mport)['validrcptto_smtpd_sessions_total{end="quit"}'] == \
            kept['validrcptto_smtpd_sessions_total{end="quit"}'] + 1
    finally:
        assert srv.stop() == 0


def test_a_metrics_address_in_use_fails_at_start():
    from helpers.tools import script
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        where = f"127.0.0.1:{taken.getsockname()[1]}"
        done = subprocess.run([script("validrcptto-smtpd"), "--listen", "127.0.0.1:0",
                               "--metrics", where], capture_output=True, text=True, timeout=30)
    assert done.returncode == 111 and f"cannot serve metrics on {where}" in done.stderr


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """urllib must talk to the server itself, whatever proxy the machine sets."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.delenv("http_proxy", raising=False)


def test_report_on_a_captured_multilog_file(tmp_path: Path):
    """The server's stderr through the real multilog; then `qmail-updater report`."""
    from helpers.tools import script
    env = {**smtp_tree(tmp_path), "VALIDRCPTTO_LIMIT": "3"}
    logdir = tmp_path / "log"
    port = free_port()
    server = subprocess.Popen([script("validrcptto-smtpd"), "--listen", f"127.0.0.1:{port}"],
                              env=env, stderr=subprocess.PIPE)
    multilog = subprocess.Popen([need("multilog"), "t", str(logdir)], stdin=server.stderr)
    server.stderr.close()
    try:
        s = greeted(port, wait=15)
        s.cmd("HELO x")
        s.cmd("MAIL FROM:<a@b.example>")
        for rcpt in ("nobody@example.com", "Other@Example.COM", "relay@elsewhere.test",
                     "joe@example.com", "x@blockdom.net"):
            s.cmd(f"RCPT TO:<{rcpt}>")
        s.close()
        s = greeted(port)
        s.cmd("HELO x")
        s.cmd("MAIL FROM:<a@b.example>")
        for n in range(3):
            s.cmd(f"RCPT TO:<harvest{n}@example.com>")             # the third: 421
        s.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        multilog.wait(10)
    current = logdir / "current"
    assert current.read_text().startswith("@4000")
    done = subprocess.run([script("qmail-updater"), "report", "--since", "1h", str(current)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "sessions:             2\n" in out
    assert "recipients refused:   6 (not in the validrcptto list), 1 (domain not in " \
        "rcpthosts)" in out
    assert "hung up:              2 (too many invalid recipients)" in out
    assert "       5  example.com\n" in out and "       1  blockdom.net\n" in out
    assert "nobody" not in out and "harvest" not in out              # counts, no addresses
    assert "not in rcpthosts: elsewhere.test" in current.read_text()   # the domain only
    assert "relay@" not in current.read_text()
    old = subprocess.run([script("qmail-updater"), "report", "--since", "0", str(current)],
                         capture_output=True, text=True, timeout=60)
    assert "recipients refused:   0" in old.stdout                   # nothing that recent


def test_tcpserver_mode_keeps_a_textfile(tmp_path: Path):
    """Under tcpserver each session is a process: METRICS_TEXTFILE adds each one to
    totals kept beside the textfile, which node-exporter's textfile collector reads."""
    from prometheus_client.parser import text_string_to_metric_families

    from helpers.tools import script
    env = smtp_tree(tmp_path)
    textfile = tmp_path / "validrcptto_smtpd.prom"
    port = free_port()
    server = subprocess.Popen([need("tcpserver"), "-HR", "-l", "mx.example.com", "127.0.0.1",
                               str(port), script("validrcptto-smtpd")],
                              env={**env, "METRICS_TEXTFILE": str(textfile)},
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        s = greeted(port, wait=15)
        s.cmd("HELO x")
        s.cmd("MAIL FROM:<a@b.example>")
        assert s.cmd("RCPT TO:<nobody@example.com>").startswith(b"553")
        assert s.cmd("RCPT TO:<joe@example.com>").startswith(b"250")
        s.cmd("QUIT")
        s.close()
        s = greeted(port)
        s.cmd("HELO x")
        s.cmd("MAIL FROM:<a@b.example>")
        s.cmd("RCPT TO:<joe@example.com>")
        s.close()                                               # no QUIT: "error"
        deadline = time.monotonic() + 10
        got: dict[str, float] = {}
        while got.get('validrcptto_smtpd_sessions_total{end="error"}') != 1.0:
            assert time.monotonic() < deadline, got
            time.sleep(0.1)
            if textfile.exists():
                got = {}
                for fam in text_string_to_metric_families(textfile.read_text()):
                    for sample in fam.samples:
                        tags = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                        got[f"{sample.name}{{{tags}}}" if tags else sample.name] = sample.value
        assert got['validrcptto_smtpd_sessions_total{end="quit"}'] == 1.0
        assert got['validrcptto_smtpd_rcpt_total{reason="validrcptto",result="accepted"}'] == 2.0
        assert got['validrcptto_smtpd_rcpt_total{reason="validrcptto",result="rejected"}'] == 1.0
        assert got["validrcptto_smtpd_session_duration_seconds_count"] == 2.0
        assert got["validrcptto_cdb_entries"] == 11.0
        assert (tmp_path / "validrcptto_smtpd.prom.data").stat().st_size == 8 * len(
            __import__("updater.serving.metrics", fromlist=["SLOTS"]).SLOTS)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)
